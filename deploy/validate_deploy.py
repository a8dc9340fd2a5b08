#!/usr/bin/env python3
"""Offline validation of everything under deploy/ and k8s/ (run by scripts/validate_deploy.sh).

There is no Docker engine or cluster here, so the files are kept correct by checking them:

- Kubernetes: `kubectl kustomize` renders k8s/base and every overlay; each object (and the
  Secret shapes in k8s/secret.example.yaml) is validated against bundled schemas: core kinds
  with kubernetes-validate (strict: unknown fields are errors), KEDA's ScaledObject and
  TriggerAuthentication and prometheus-operator's ServiceMonitor with the cloudcoil models
  generated from those projects' CRDs (strict types; unknown fields are errors). An object of
  a kind with no schema fails. Then the references between objects and the worker contract:
  probes, security context, grace periods, queues, secrets, settings names.
- Compose: dclint (the Compose specification's JSON schema plus lint rules), then references:
  mounted files, Dockerfiles, settings names, Prometheus targets.
- Dockerfiles: hadolint, and the `cargo build -p <crate> --bin <bin>` line against the
  workspace.
- Grafana: every panel query parses as PromQL (promql-parser) and uses only metrics the workers
  export.
- Settings values: every settings file with each container's literal MEDIAFARM_* variables goes
  through `mediafarm check-settings` (the workers' own parser and checks).

Prints one line per check and a summary; exits 1 when any check failed.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

ROOT = Path(__file__).resolve().parent.parent
# Oldest and newest Kubernetes minor the manifests are checked against.
K8S_VERSIONS = ("1.29.0", "1.37.0")
WORKER_QUEUES = {"image-worker": "image", "snapshot-worker": "snapshot", "notify-worker": "notify"}
METRICS_PORT = 9808
# A Kubernetes resource quantity ("500m", "2", "1.5Gi", "128974848", "129e6"); the OpenAPI
# schema types it only as int-or-string, the API server parses it.
QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)(([KMGTPE]i)|[numkMGTPE]|[eE][+-]?\d+)?$")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class Report:
    """Results of every check, printed as they come and summed up at the end."""

    passed: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)

    def check(self, name: str, problems: Iterable[str]) -> None:
        problems = list(problems)
        if problems:
            self.failed += 1
            self.failures.extend(f"{name}: {p}" for p in problems)
            print(f"FAIL  {name}")
            for p in problems:
                print(f"        - {p}")
        else:
            self.passed += 1
            print(f"ok    {name}")


# --- helpers -----------------------------------------------------------------------------------


def run(cmd: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


def setting_names() -> set[str]:
    """SETTING_NAMES as shared/src/settings.rs has it now (other work adds settings)."""
    text = (ROOT / "shared/src/settings.rs").read_text()
    block = re.search(r"pub const SETTING_NAMES: &\[&str\] = &\[(.*?)\];", text, re.S)
    if not block:
        raise SystemExit("cannot find SETTING_NAMES in shared/src/settings.rs")
    return set(re.findall(r'"([a-z0-9_]+)"', block.group(1)))


def exported_metrics() -> set[str]:
    """Metric names the workers export, with the suffixes Prometheus gives each type."""
    text = (ROOT / "shared/src/metrics.rs").read_text()
    names: set[str] = set()
    for name in re.findall(r'"(celery_[a-z_]+)"', text):
        names.update({name, f"{name}_total", f"{name}_bucket", f"{name}_sum", f"{name}_count"})
    return names


def settings_problems(toml_text: str, origin: str, known: set[str]) -> list[str]:
    try:
        table = tomllib.loads(toml_text)
    except tomllib.TOMLDecodeError as e:
        return [f"{origin} is not valid TOML: {e}"]
    return [f"{origin}: unknown setting `{k}`" for k in table if k not in known]


def env_problems(names: Iterable[str], origin: str, known: set[str]) -> list[str]:
    out = []
    for name in names:
        if name.startswith("MEDIAFARM_") and name != "MEDIAFARM_LOG_FORMAT":
            if name[len("MEDIAFARM_"):].lower() not in known:
                out.append(f"{origin}: {name} names no setting")
    return out


def check_settings(binary: Path, toml_text: str, env: dict[str, str], origin: str) -> list[str]:
    """Runs the real settings parser on a file plus environment, in an otherwise clean
    environment so this machine's MEDIAFARM_* variables play no part."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write(toml_text)
        f.flush()
        clean = {"PATH": "/usr/bin:/bin"} | {k: str(v) for k, v in env.items()}
        r = subprocess.run([str(binary), "--config", f.name, "check-settings"], env=clean,
                           capture_output=True, text=True, check=False)
    if r.returncode != 0:
        return [f"{origin}: {(r.stderr or r.stdout).strip().replace(f.name, 'settings file')}"]
    return []


def literal_mediafarm_env(env: Any) -> dict[str, str]:
    """MEDIAFARM_* variables given as values (Compose mapping or list, or Kubernetes env)."""
    if isinstance(env, dict):
        items = env.items()
    else:
        items = []
        for e in env or []:
            if isinstance(e, dict) and "value" in e:
                items.append((e["name"], e["value"]))
            elif isinstance(e, str) and "=" in e:
                items.append(tuple(e.split("=", 1)))
    return {k: str(v) for k, v in items if k.startswith("MEDIAFARM_") and k != "MEDIAFARM_LOG_FORMAT"}


def kn(obj: dict) -> str:
    meta = obj.get("metadata") or {}
    return f"{obj.get('kind')}/{meta.get('name')}"


def matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# --- schema validation of Kubernetes objects ---------------------------------------------------


def crd_models() -> dict[tuple[str, str], Any]:
    from cloudcoil.models.keda import v1alpha1 as keda
    from cloudcoil.models.prometheus_operator import v1 as promop

    return {
        ("keda.sh/v1alpha1", "ScaledObject"): keda.ScaledObject,
        ("keda.sh/v1alpha1", "TriggerAuthentication"): keda.TriggerAuthentication,
        ("monitoring.coreos.com/v1", "ServiceMonitor"): promop.ServiceMonitor,
    }


def unknown_fields(given: Any, kept: Any, path: str) -> list[str]:
    """Fields of `given` that the model dropped: pydantic ignores unknown keys, the API server
    refuses them (strict field validation), so they are reported."""
    out: list[str] = []
    if isinstance(given, dict) and isinstance(kept, dict):
        for k, v in given.items():
            if k not in kept:
                out.append(f"unknown field {path}.{k}")
            else:
                out.extend(unknown_fields(v, kept[k], f"{path}.{k}"))
    elif isinstance(given, list) and isinstance(kept, list):
        for i, (g, k) in enumerate(zip(given, kept)):
            out.extend(unknown_fields(g, k, f"{path}[{i}]"))
    return out


def validate_crd(obj: dict, model: Any) -> list[str]:
    import pydantic

    try:
        parsed = model.model_validate(obj, strict=True)
    except pydantic.ValidationError as e:
        return [
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()[:10]
        ]
    kept = parsed.model_dump(mode="json", by_alias=True, exclude_unset=True)
    return unknown_fields(obj, kept, "")


def validate_object(obj: dict, models: dict[tuple[str, str], Any]) -> list[str]:
    import kubernetes_validate

    key = (obj.get("apiVersion"), obj.get("kind"))
    if key in models:
        return validate_crd(obj, models[key])
    problems = []
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            return [f"no schema for {key[0]} {key[1]} (add its CRD models to the validator)"]
        except kubernetes_validate.ValidationError as e:
            # The library stops at the first error; fixing it shows the next.
            where = ".".join(str(p) for p in e.absolute_path) or "(top)"
            problems.append(f"Kubernetes {version}: {where}: {e.message[:300]}")
    return problems


# --- the worker contract on rendered manifests ---------------------------------------------------


def container_args(c: dict) -> list[str]:
    return list(c.get("command") or []) + list(c.get("args") or [])


def flag(args: list[str], *names: str) -> str | None:
    for i, a in enumerate(args):
        for n in names:
            if a == n and i + 1 < len(args):
                return args[i + 1]
            if a.startswith(n + "="):
                return a.split("=", 1)[1]
    return None


def env_value(c: dict, name: str) -> str | None:
    for e in c.get("env") or []:
        if e.get("name") == name:
            return e.get("value")
    return None


def shutdown_grace(settings: dict, c: dict) -> float:
    env = env_value(c, "MEDIAFARM_WORKER_SHUTDOWN_GRACE")
    return float(env if env is not None else settings.get("worker_shutdown_grace", 30))


def workload_problems(objs: list[dict], secret_keys: dict[str, set[str]], known: set[str]) -> list[str]:
    """Every Deployment: security, resources, probes, settings, secrets, grace period."""
    out: list[str] = []
    by_kind: dict[str, dict[str, dict]] = {}
    for o in objs:
        by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o
    config_maps = by_kind.get("ConfigMap", {})
    for name, cm in config_maps.items():
        for fname, text in (cm.get("data") or {}).items():
            if fname.endswith(".toml"):
                out.extend(settings_problems(text, f"ConfigMap/{name} {fname}", known))
    for name, d in by_kind.get("Deployment", {}).items():
        where = f"Deployment/{name}"
        pod = d["spec"]["template"]["spec"]
        psc = pod.get("securityContext") or {}
        if not psc.get("runAsNonRoot") or not psc.get("runAsUser"):
            out.append(f"{where}: pod must set runAsNonRoot and a numeric runAsUser")
        if pod.get("automountServiceAccountToken") is not False:
            out.append(f"{where}: automountServiceAccountToken must be false")
        volumes = {v["name"]: v for v in pod.get("volumes") or []}
        settings: dict = {}
        for v in volumes.values():
            cm_ref = (v.get("configMap") or {}).get("name")
            if cm_ref is not None:
                if cm_ref not in config_maps:
                    out.append(f"{where}: volume {v['name']} refers to missing ConfigMap {cm_ref}")
                elif "mediafarm.toml" in (config_maps[cm_ref].get("data") or {}):
                    try:
                        settings = tomllib.loads(config_maps[cm_ref]["data"]["mediafarm.toml"])
                    except tomllib.TOMLDecodeError:
                        pass  # reported with the ConfigMap
        for c in pod["containers"]:
            cw = f"{where} container {c['name']}"
            sc = c.get("securityContext") or {}
            if sc.get("allowPrivilegeEscalation") is not False:
                out.append(f"{cw}: allowPrivilegeEscalation must be false")
            if sc.get("readOnlyRootFilesystem") is not True:
                out.append(f"{cw}: readOnlyRootFilesystem must be true")
            if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                out.append(f"{cw}: capabilities must drop ALL")
            res = c.get("resources") or {}
            for part in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    value = (res.get(part) or {}).get(r)
                    if value is None:
                        out.append(f"{cw}: resources.{part}.{r} is missing")
                    elif not QUANTITY.match(str(value)):
                        out.append(f"{cw}: resources.{part}.{r} {value!r} is not a quantity")
            mounts = {m["mountPath"]: m for m in c.get("volumeMounts") or []}
            tmp = mounts.get("/tmp")
            if not tmp or "emptyDir" not in volumes.get(tmp["name"], {}):
                out.append(f"{cw}: /tmp must be an emptyDir (the root filesystem is read-only)")
            for m in mounts.values():
                if m["name"] not in volumes:
                    out.append(f"{cw}: mounts missing volume {m['name']}")
            args = container_args(c)
            if flag(args, "--config") != "/etc/mediafarm/mediafarm.toml" or "/etc/mediafarm" not in mounts:
                out.append(f"{cw}: must read --config /etc/mediafarm/mediafarm.toml from the settings ConfigMap")
            env_names = [e["name"] for e in c.get("env") or []]
            out.extend(env_problems(env_names, cw, known))
            for e in c.get("env") or []:
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref and ref.get("key") not in secret_keys.get(ref.get("name"), set()):
                    out.append(f"{cw}: env {e['name']} refers to {ref.get('name')}/{ref.get('key')}, "
                               f"which k8s/secret.example.yaml does not define")
            if name in WORKER_QUEUES:
                queue = flag(args, "--queues", "-Q")
                if queue != WORKER_QUEUES[name]:
                    out.append(f"{cw}: consumes {queue!r}, expected queue {WORKER_QUEUES[name]!r}")
                ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
                if ports.get("metrics") != METRICS_PORT:
                    out.append(f"{cw}: needs container port `metrics` = {METRICS_PORT}")
                addr = str(settings.get("metrics_addr", ""))
                if addr != f"0.0.0.0:{METRICS_PORT}":
                    out.append(f"{cw}: settings metrics_addr is {addr!r}, probes need 0.0.0.0:{METRICS_PORT}")
                for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                    get = (c.get(probe) or {}).get("httpGet") or {}
                    if get.get("path") != path or get.get("port") not in ("metrics", METRICS_PORT):
                        out.append(f"{cw}: {probe} must GET {path} on port metrics")
                if name == "notify-worker":
                    tdir = str(settings.get("notify_template_dir", "./templates"))
                    if tdir not in mounts:
                        out.append(f"{cw}: notify_template_dir {tdir} is not a mounted volume")
                grace = pod.get("terminationGracePeriodSeconds", 30)
                drain = shutdown_grace(settings, c)
                if grace <= drain:
                    out.append(f"{cw}: terminationGracePeriodSeconds {grace} must exceed "
                               f"worker_shutdown_grace {drain:g}")
    return out


PERCENT_OR_INT = ("maxUnavailable", "maxSurge", "minAvailable")


def int_or_percent_problems(node: Any, path: str) -> list[str]:
    """maxUnavailable, maxSurge and minAvailable: the schema says int-or-string, the API server
    takes a whole number or a percentage only."""
    out: list[str] = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k in PERCENT_OR_INT and not isinstance(v, int) and not re.fullmatch(r"\d+%", str(v)):
                out.append(f"{path}.{k} {v!r} is neither a whole number nor a percentage")
            out.extend(int_or_percent_problems(v, f"{path}.{k}"))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.extend(int_or_percent_problems(v, f"{path}[{i}]"))
    return out


def settings_value_problems(objs: list[dict], binary: Path) -> list[str]:
    """Each container's settings file (its ConfigMap) with its literal MEDIAFARM_* values."""
    out: list[str] = []
    cms = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ConfigMap"}
    for d in (o for o in objs if o["kind"] == "Deployment"):
        pod = d["spec"]["template"]["spec"]
        texts = [cms[v["configMap"]["name"]]["data"]["mediafarm.toml"] for v in pod.get("volumes") or []
                 if "configMap" in v and "mediafarm.toml" in (cms.get(v["configMap"]["name"], {}).get("data") or {})]
        for c in pod["containers"]:
            for text in texts:
                out.extend(check_settings(binary, text, literal_mediafarm_env(c.get("env")),
                                          f"{kn(d)} container {c['name']}"))
    return out


def reference_problems(objs: list[dict]) -> list[str]:
    """Selectors and names that must point at something: Services, PDBs, KEDA, ServiceMonitor."""
    out: list[str] = [p for o in objs for p in int_or_percent_problems(o.get("spec"), f"{kn(o)}: spec")]
    deployments = [o for o in objs if o["kind"] == "Deployment"]
    services = [o for o in objs if o["kind"] == "Service"]
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}

    def pods_of(selector: dict) -> list[dict]:
        return [d for d in deployments
                if matches(selector, d["spec"]["template"]["metadata"].get("labels") or {})]

    for s in services:
        targets = pods_of(s["spec"].get("selector") or {})
        if not targets:
            out.append(f"{kn(s)}: selector matches no Deployment's pods")
        for p in s["spec"].get("ports") or []:
            tp = p.get("targetPort")
            if isinstance(tp, str) and not any(
                    tp in {cp.get("name") for c in d["spec"]["template"]["spec"]["containers"]
                           for cp in c.get("ports") or []} for d in targets):
                out.append(f"{kn(s)}: targetPort {tp} is no container port of its pods")
    for p in (o for o in objs if o["kind"] == "PodDisruptionBudget"):
        if not pods_of(p["spec"]["selector"].get("matchLabels") or {}):
            out.append(f"{kn(p)}: selector matches no Deployment's pods")
    for d in deployments:
        if d["spec"]["selector"]["matchLabels"].items() - d["spec"]["template"]["metadata"]["labels"].items():
            out.append(f"{kn(d)}: selector does not match its own pod labels")
    scaled = set()
    for so in (o for o in objs if o["kind"] == "ScaledObject"):
        target = so["spec"]["scaleTargetRef"]["name"]
        scaled.add(target)
        if ("Deployment", target) not in names:
            out.append(f"{kn(so)}: scaleTargetRef {target} is no Deployment")
        dep = next((d for d in deployments if d["metadata"]["name"] == target), None)
        for t in so["spec"]["triggers"]:
            md = t.get("metadata") or {}
            if t.get("type") != "rabbitmq":
                out.append(f"{kn(so)}: trigger type {t.get('type')}, expected rabbitmq")
                continue
            if md.get("protocol") != "http":
                out.append(f"{kn(so)}: protocol must be http (management API: unacked messages count)")
            if md.get("mode") != "QueueLength":
                out.append(f"{kn(so)}: mode must be QueueLength")
            if str(md.get("excludeUnacknowledged", "false")).lower() == "true":
                out.append(f"{kn(so)}: excludeUnacknowledged would scale busy workers away")
            auth = (t.get("authenticationRef") or {}).get("name")
            if ("TriggerAuthentication", auth) not in names:
                out.append(f"{kn(so)}: authenticationRef {auth} is no TriggerAuthentication")
            if dep is not None:
                c = dep["spec"]["template"]["spec"]["containers"][0]
                queue = flag(container_args(c), "--queues", "-Q")
                if md.get("queueName") != queue:
                    out.append(f"{kn(so)}: queueName {md.get('queueName')} but {target} consumes {queue}")
                if target == "snapshot-worker":
                    per_pod = flag(container_args(c), "--concurrency", "-c")
                    if md.get("value") != per_pod:
                        out.append(f"{kn(so)}: value {md.get('value')} must equal sessions per pod "
                                   f"(--concurrency {per_pod})")
                    if env_value(c, "MEDIAFARM_WORKER_PREFETCH_MULTIPLIER") != "1":
                        out.append(f"{kn(so)}: snapshot pods need MEDIAFARM_WORKER_PREFETCH_MULTIPLIER=1")
                    sessions = env_value(c, "MEDIAFARM_SNAPSHOT_MAX_SESSIONS")
                    if sessions != per_pod:
                        out.append(f"{kn(so)}: MEDIAFARM_SNAPSHOT_MAX_SESSIONS {sessions} must equal "
                                   f"--concurrency {per_pod} (a slot for every session, none beyond)")
    for worker in WORKER_QUEUES:
        if ("Deployment", worker) in names and worker not in scaled:
            out.append(f"Deployment/{worker}: no ScaledObject scales it")
        if ("Deployment", worker) in names and ("PodDisruptionBudget", worker) not in names:
            out.append(f"Deployment/{worker}: no PodDisruptionBudget")
        if ("Deployment", worker) in names and not any(
                d["metadata"]["name"] == worker and "replicas" not in d["spec"] for d in deployments):
            out.append(f"Deployment/{worker}: sets replicas, which fights KEDA's HPA")
    beat = next((d for d in deployments if d["metadata"]["name"] == "mediafarm-beat"), None)
    if beat is not None and beat["spec"].get("replicas") != 2:
        out.append("Deployment/mediafarm-beat: expected 2 replicas (the Redis lease keeps one active)")
    for sm in (o for o in objs if o["kind"] == "ServiceMonitor"):
        sel = sm["spec"]["selector"].get("matchLabels") or {}
        hit = [s for s in services if matches(sel, s["metadata"].get("labels") or {})]
        if not hit:
            out.append(f"{kn(sm)}: selector matches no Service")
        for ep in sm["spec"]["endpoints"]:
            for s in hit:
                if ep.get("port") not in {p.get("name") for p in s["spec"]["ports"]}:
                    out.append(f"{kn(sm)}: {kn(s)} has no port named {ep.get('port')}")
    return out


# --- the checks ---------------------------------------------------------------------------------


def render(kustomization_dir: Path) -> tuple[list[dict], list[str]]:
    r = run(["kubectl", "kustomize", str(kustomization_dir)])
    if r.returncode != 0:
        return [], [f"kubectl kustomize failed: {r.stderr.strip()[:800]}"]
    return [o for o in yaml.safe_load_all(r.stdout) if o], []


def check_k8s(report: Report, known: set[str], binary: Path) -> None:
    if not shutil.which("kubectl"):
        report.check("kubectl", ["kubectl (with built-in kustomize) is not installed: run scripts/setup.sh"])
        return
    models = crd_models()
    secret_file = ROOT / "k8s/secret.example.yaml"
    secrets = [o for o in yaml.safe_load_all(secret_file.read_text()) if o]
    secret_keys = {s["metadata"]["name"]: set((s.get("stringData") or {}) | (s.get("data") or {}))
                   for s in secrets if s.get("kind") == "Secret"}
    report.check("k8s/secret.example.yaml: schema",
                 (f"{kn(o)}: {p}" for o in secrets for p in validate_object(o, models)))
    report.check("k8s/secret.example.yaml: setting names",
                 (p for s in secrets for p in env_problems(s.get("stringData") or {}, kn(s), known)))
    dirs = [ROOT / "k8s/base"] + sorted(p.parent for p in (ROOT / "k8s/overlays").glob("*/kustomization.yaml"))
    for d in dirs:
        label = str(d.relative_to(ROOT))
        objs, problems = render(d)
        report.check(f"{label}: kustomize render ({len(objs)} objects)", problems)
        if problems:
            continue
        kinds = sorted({o["kind"] for o in objs})
        report.check(f"{label}: schemas ({', '.join(kinds)})",
                     (f"{kn(o)}: {p}" for o in objs for p in validate_object(o, models)))
        report.check(f"{label}: workloads (security, probes, resources, grace, settings, secrets)",
                     workload_problems(objs, secret_keys, known))
        report.check(f"{label}: references (Services, PDBs, KEDA, ServiceMonitor)",
                     reference_problems(objs))
        report.check(f"{label}: settings values per container (mediafarm check-settings)",
                     settings_value_problems(objs, binary))
        for kind in ("Deployment", "ScaledObject", "TriggerAuthentication", "PodDisruptionBudget",
                     "ServiceMonitor", "ConfigMap", "Service"):
            if not any(o["kind"] == kind for o in objs):
                report.check(f"{label}: has a {kind}", [f"no {kind} rendered"])


def check_compose(report: Report, known: set[str], tools: Path, binary: Path) -> None:
    compose_file = ROOT / "deploy/compose.yaml"
    dclint = tools / "node_modules/.bin/dclint"
    if not dclint.exists():
        report.check("deploy/compose.yaml: dclint", [f"{dclint} is missing: run scripts/setup.sh"])
    else:
        r = run([str(dclint), "--config", "deploy/dclint.json", "--max-warnings", "0",
                 str(compose_file.relative_to(ROOT))])
        lines = ANSI.sub("", r.stdout + r.stderr).splitlines()
        report.check("deploy/compose.yaml: Compose schema and lint (dclint)",
                     [line.strip() for line in lines if line.strip()] if r.returncode else [])
    doc = yaml.safe_load(compose_file.read_text())
    services = doc.get("services") or {}
    out: list[str] = []
    checked_settings: set[Path] = set()
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        for dep in deps:
            if dep not in services:
                out.append(f"{name}: depends_on unknown service {dep}")
        build = svc.get("build")
        if build:
            context = (compose_file.parent / build["context"]).resolve()
            if not (context / build["dockerfile"]).is_file():
                out.append(f"{name}: Dockerfile {build['dockerfile']} not found in {context}")
        for vol in svc.get("volumes") or []:
            src = vol.split(":")[0]
            if src.startswith("."):
                path = compose_file.parent / src
                if not path.exists():
                    out.append(f"{name}: mounts {src}, which does not exist")
                elif src.endswith(".toml") and path not in checked_settings:
                    checked_settings.add(path)
                    out.extend(settings_problems(path.read_text(), src, known))
        env = svc.get("environment") or {}
        out.extend(env_problems(env if isinstance(env, dict) else [e.split("=")[0] for e in env], name, known))
    for worker, queue in WORKER_QUEUES.items():
        cmd = (services.get(worker) or {}).get("command") or []
        if flag(cmd, "--queues", "-Q") != queue:
            out.append(f"{worker}: must consume queue {queue}")
        grace = (services.get(worker) or {}).get("stop_grace_period", "10s")
        if int(str(grace).rstrip("s")) <= 30:
            out.append(f"{worker}: stop_grace_period {grace} must exceed worker_shutdown_grace (30 s)")
    for needed in ("rabbitmq", "redis", "minio", "mailpit", "beat", "prometheus", "grafana", *WORKER_QUEUES):
        if needed not in services:
            out.append(f"service {needed} is missing")
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    for job in prom.get("scrape_configs") or []:
        for sc in job.get("static_configs") or []:
            for target in sc.get("targets") or []:
                host = target.split(":")[0]
                if host != "localhost" and host not in services:
                    out.append(f"prometheus.yml: target {target} is no compose service")
    report.check("deploy/compose.yaml: services, mounts, settings, Prometheus targets", out)
    values: list[str] = []
    for name, svc in services.items():
        for vol in svc.get("volumes") or []:
            src, _, dest = vol.partition(":")
            if dest.startswith("/etc/mediafarm/mediafarm.toml") and (compose_file.parent / src).is_file():
                values.extend(check_settings(binary, (compose_file.parent / src).read_text(),
                                             literal_mediafarm_env(svc.get("environment")), name))
    report.check("deploy/compose.yaml: settings values per service (mediafarm check-settings)", values)


def grafana_to_promql(expr: str) -> str:
    """A panel query as Prometheus receives it: Grafana's interval macros and variables filled."""
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", expr)
    return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", ".*", expr)


def check_dashboards(report: Report) -> None:
    import promql_parser

    metrics = exported_metrics()
    out: list[str] = []
    files = sorted((ROOT / "deploy/grafana/dashboards").glob("*.json"))
    if not files:
        out.append("no dashboard JSON in deploy/grafana/dashboards")
    for f in files:
        try:
            dash = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            out.append(f"{f.name}: not JSON: {e}")
            continue
        exprs = [t["expr"] for p in dash.get("panels", []) for t in p.get("targets", [])]
        exprs += [v.get("definition", "") for v in dash.get("templating", {}).get("list", [])]
        if not exprs:
            out.append(f"{f.name}: no queries")
        for e in (t["expr"] for p in dash.get("panels", []) for t in p.get("targets", [])):
            try:
                promql_parser.parse(grafana_to_promql(e))
            except ValueError as err:
                out.append(f"{f.name}: PromQL does not parse ({err}): {e}")
        for e in exprs:
            for name in set(re.findall(r"\b(celery_[a-z_]+)", e)):
                if name not in metrics:
                    out.append(f"{f.name}: query uses {name}, which no worker exports")
        ids = [p.get("id") for p in dash.get("panels", [])]
        if len(ids) != len(set(ids)):
            out.append(f"{f.name}: panel ids repeat")
    report.check("deploy/grafana: dashboards (PromQL parses, exported metrics only)", out)


def workspace_bins() -> dict[str, set[str]]:
    """Package name -> binary names, from the workspace's Cargo.toml files."""
    root = tomllib.loads((ROOT / "Cargo.toml").read_text())
    out: dict[str, set[str]] = {}
    for member in root["workspace"]["members"]:
        manifest = tomllib.loads((ROOT / member / "Cargo.toml").read_text())
        bins = {b["name"] for b in manifest.get("bin", [])}
        bins |= {p.stem for p in (ROOT / member / "src/bin").glob("*.rs")}
        out[manifest["package"]["name"]] = bins
    return out


def check_dockerfiles(report: Report, hadolint: str | None) -> None:
    files = sorted((ROOT / "deploy/docker").glob("*.Dockerfile"))
    if hadolint is None:
        report.check("Dockerfiles: hadolint", ["hadolint is not installed: run scripts/setup.sh"])
    else:
        r = run([hadolint, "--no-color", *[str(f.relative_to(ROOT)) for f in files]])
        report.check(f"Dockerfiles: hadolint ({len(files)} files)",
                     r.stdout.splitlines() + r.stderr.splitlines() if r.returncode else [])
    bins = workspace_bins()
    out: list[str] = []
    for f in files:
        text = f.read_text()
        m = re.search(r"cargo build --release --locked -p (\S+) --bin (\S+)", text)
        if not m:
            out.append(f"{f.name}: no `cargo build --release --locked -p <crate> --bin <bin>`")
            continue
        pkg, binary = m.groups()
        if pkg not in bins:
            out.append(f"{f.name}: -p {pkg} is no workspace package")
        elif binary not in bins[pkg]:
            out.append(f"{f.name}: package {pkg} has no binary {binary}")
        if f"target/release/{binary}" not in text:
            out.append(f"{f.name}: does not copy target/release/{binary}")
        if not re.search(r"^FROM rust:1\.95-bookworm AS builder$", text, re.M):
            out.append(f"{f.name}: builder must be rust:1.95-bookworm")
        user = re.findall(r"^USER (\S+)$", text, re.M)
        if not user or not re.fullmatch(r"[1-9]\d*:[1-9]\d*", user[-1]):
            out.append(f"{f.name}: the runtime stage must run as a numeric non-root USER uid:gid")
        ffmpeg = "libavcodec" in text.split("AS builder", 1)[-1].split("FROM", 1)[-1]
        if ffmpeg != (binary == "snapshot-worker"):
            out.append(f"{f.name}: only the snapshot-worker runtime carries FFmpeg's libraries")
    ignore = (ROOT / ".dockerignore").read_text().split() if (ROOT / ".dockerignore").exists() else []
    for heavy in ("target", ".git", ".venv"):
        if heavy not in ignore:
            out.append(f".dockerignore: does not leave out {heavy}")
    report.check("Dockerfiles: cargo build lines, users, FFmpeg only in snapshot, .dockerignore", out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tools", type=Path, default=ROOT / "var/deploy-tools",
                        help="npm prefix holding dclint")
    parser.add_argument("--mediafarm", type=Path, default=ROOT / "target/debug/mediafarm",
                        help="the mediafarm CLI, for check-settings")
    parser.add_argument("--hadolint", default=shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint"))
    args = parser.parse_args()
    hadolint = args.hadolint if Path(args.hadolint).exists() or shutil.which(args.hadolint) else None
    known = setting_names()
    report = Report()
    if not args.mediafarm.is_file():
        report.check("mediafarm CLI", [f"{args.mediafarm} is missing: cargo build -p mediafarm --bin mediafarm"])
    checks: list[Callable[[], None]] = [
        lambda: check_k8s(report, known, args.mediafarm),
        lambda: check_compose(report, known, args.tools, args.mediafarm),
        lambda: check_dashboards(report),
        lambda: check_dockerfiles(report, hadolint),
    ]
    for c in checks:
        c()
    print()
    if report.failed:
        print(f"deploy validation FAILED: {report.failed} of {report.passed + report.failed} checks "
              f"({len(report.failures)} problems, listed above)")
        return 1
    print(f"deploy validation OK: all {report.passed} checks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
