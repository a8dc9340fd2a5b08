"""Offline validation of everything under deploy/ and k8s/: `python deploy/validate`, which
scripts/validate_deploy.sh runs (with the tools' paths).

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
- Settings: the names known are those the built programs list (`mediafarm setting-names`,
  `<worker> --setting-names`: each declares its own). Every settings file with each container's
  literal MEDIAFARM_* variables goes through the check of the program that container runs
  (`mediafarm check-settings` for beat, `<worker> --check-settings`: its own parser and checks).

Prints one line per check and a summary; exits 1 when any check failed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Callable

from common import DEBUG_BINARIES, ROOT, setting_names
from compose import check_compose
from dashboards import check_dashboards
from dockerfiles import check_dockerfiles
from k8s import check_k8s
from report import Report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tools", type=Path, default=ROOT / "var/deploy-tools",
                        help="npm prefix holding dclint")
    parser.add_argument("--mediafarm", type=Path, default=DEBUG_BINARIES / "mediafarm",
                        help="the mediafarm CLI; the worker binaries are looked for beside it")
    parser.add_argument("--hadolint", default=shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint"))
    args = parser.parse_args()
    hadolint = args.hadolint if Path(args.hadolint).exists() or shutil.which(args.hadolint) else None
    binaries = args.mediafarm.parent
    known = setting_names(binaries)
    report = Report()
    checks: list[Callable[[], None]] = [
        lambda: check_k8s(report, known, binaries),
        lambda: check_compose(report, known, args.tools, binaries),
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
