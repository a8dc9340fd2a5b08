"""deploy/compose.yaml: dclint (Compose schema and lint), then services, mounts, Dockerfiles,
settings names and values, Prometheus targets, ports on 127.0.0.1 only, and the optional
third-party services (Flower): pinned image, hardening, its profile, its broker and login, and
events from every worker."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
import yaml

from common import (ROOT, THIRD_PARTY, WORKER_QUEUES, check_settings, env_problems, flag,
                    literal_mediafarm_env, program_of, run, settings_problems, third_party,
                    third_party_image_problems)
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
    report.check("deploy/compose.yaml: published ports on 127.0.0.1 only",
                 (f"{name}: port {p} is published on every interface" for name, svc in services.items()
                  for p in svc.get("ports") or [] if not str(p).startswith("127.0.0.1:")))
    report.check("deploy/compose.yaml: third-party services (Flower: image, hardening, profile, broker, login, events)",
                 third_party_problems(services, compose_file.parent))
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


def env_map(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, dict):
        return {k: str(v) for k, v in env.items()}
    return dict(e.split("=", 1) if "=" in e else (e, "") for e in env)


def sends_events(svc: dict, base: Path) -> bool:
    """A worker's MEDIAFARM_WORKER_SEND_TASK_EVENTS, else its settings file's
    worker_send_task_events (the environment's booleans as the settings reader takes them)."""
    env = env_map(svc).get("MEDIAFARM_WORKER_SEND_TASK_EVENTS")
    if env is not None:
        return env.strip().lower() in ("true", "1", "yes", "on")
    for vol in svc.get("volumes") or []:
        src, _, dest = vol.partition(":")
        if dest.startswith("/etc/mediafarm/mediafarm.toml") and (base / src).is_file():
            try:
                return tomllib.loads((base / src).read_text()).get("worker_send_task_events") is True
            except tomllib.TOMLDecodeError:
                return False  # reported by the settings checks
    return False


def third_party_problems(services: dict, base: Path) -> list[str]:
    """Services run from someone else's image (common.THIRD_PARTY): the tested version, hardened
    like the workers (read-only root with a tmpfs /tmp, no capabilities, no new privileges),
    optional (a profile). Flower: the workers' broker, a login, and every worker sending events."""
    out: list[str] = []
    for name, svc in services.items():
        t = third_party(str(svc.get("image", "")))
        if t is None:
            continue
        out.extend(third_party_image_problems(svc["image"], t, name))
        if svc.get("read_only") is not True:
            out.append(f"{name}: read_only must be true")
        if "/tmp" not in (svc.get("tmpfs") or []):
            out.append(f"{name}: needs a tmpfs /tmp (the root filesystem is read-only)")
        if "ALL" not in (svc.get("cap_drop") or []):
            out.append(f"{name}: cap_drop must hold ALL")
        if "no-new-privileges:true" not in (svc.get("security_opt") or []):
            out.append(f"{name}: security_opt must hold no-new-privileges:true")
        if not svc.get("profiles"):
            out.append(f"{name}: an optional service: give it a profile")
        if t is not THIRD_PARTY["flower"]:
            continue
        env = env_map(svc)
        brokers = {env_map(services[w]).get("MEDIAFARM_BROKER_URL") for w in WORKER_QUEUES if w in services}
        if len(brokers) != 1 or env.get("CELERY_BROKER_URL") not in brokers:
            out.append(f"{name}: CELERY_BROKER_URL {env.get('CELERY_BROKER_URL')!r} is not the workers' "
                       f"MEDIAFARM_BROKER_URL ({', '.join(sorted(map(str, brokers)))})")
        if not env.get("FLOWER_BASIC_AUTH"):
            out.append(f"{name}: FLOWER_BASIC_AUTH must be set (Flower can revoke tasks and stop workers)")
        test = " ".join(map(str, (svc.get("healthcheck") or {}).get("test") or []))
        if f":{t.port}{t.health}" not in test:
            out.append(f"{name}: healthcheck must GET {t.health} on port {t.port}")
        for worker in WORKER_QUEUES:
            if worker in services and not sends_events(services[worker], base):
                out.append(f"{worker}: {name} runs, so the worker must send events "
                           f"(MEDIAFARM_WORKER_SEND_TASK_EVENTS or worker_send_task_events)")
    return out
