# Tools for scripts/validate_deploy.sh (sourced by scripts/setup.sh; idempotent):
# - kubectl with its built-in kustomize (v5), to render k8s/ offline;
# - Node's dclint (Compose schema + lint) under var/deploy-tools; binutils' readelf;
# - kubernetes-validate, the KEDA / Prometheus Operator models and hadolint are Python packages
#   in tests/py/requirements.txt, installed into .venv by setup.sh itself.
DCLINT_VERSION=3.1.0

if ! kubectl kustomize --help >/dev/null 2>&1; then
  # Debian's kubernetes-client (1.20) bundles a kustomize too old for k8s/ (labels:,
  # includeTemplates); the `kubectl` package comes from Google Cloud's apt repository, which
  # this project's machines have configured.
  if apt-cache policy kubectl 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    apt_install kubectl
  else
    log "kubectl is not installable from the configured apt sources: install kubectl >= 1.27 (kustomize v5) for scripts/validate_deploy.sh"
  fi
fi

# readelf: which shared libraries each binary links (against its runtime image).
command -v readelf >/dev/null || apt_install binutils

if [ ! -x var/deploy-tools/node_modules/.bin/dclint ] \
   || [ "$(node -p 'require("./var/deploy-tools/node_modules/dclint/package.json").version' 2>/dev/null)" != "$DCLINT_VERSION" ]; then
  command -v npm >/dev/null || apt_install nodejs npm
  # dclint 3 needs Node >= 20.19 (this project's machines have 20.x from NodeSource; Debian
  # bookworm's own nodejs is 18, on which dclint will not start and the validation fails).
  node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a === 20 && b >= 19) ? 0 : 1)' \
    || log "node $(node --version) is older than dclint $DCLINT_VERSION needs (>= 20.19)"
  log "installing dclint $DCLINT_VERSION into var/deploy-tools"
  mkdir -p var/deploy-tools
  npm install --prefix var/deploy-tools --no-save --no-package-lock --no-audit --no-fund --silent \
    "dclint@$DCLINT_VERSION" >/dev/null
fi
