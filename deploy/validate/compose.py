"""deploy/compose.yaml: dclint (Compose schema and lint), then services, mounts, Dockerfiles,
settings names and values, Prometheus targets."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from common import (ROOT, WORKER_QUEUES, check_settings, env_problems, flag, literal_mediafarm_env,
                    program_of, run, settings_problems)
from report import Report

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def check_compose(report: Report, known: set[str], tools: Path, binaries: Path) -> None:
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
                program = binaries / program_of([], name)
                values.extend(check_settings(program, (compose_file.parent / src).read_text(),
                                             literal_mediafarm_env(svc.get("environment")),
                                             f"{name} ({program.name})"))
    report.check("deploy/compose.yaml: settings values per service (each program's own check)", values)
