"""What several checks share: the repository's paths, its settings names and metrics, the real
settings parsers (each program checks what it reads: `mediafarm check-settings` the core and
beat settings, `<worker> --check-settings` the core and that worker's), and small lookups in
manifests."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import tomllib

ROOT = Path(__file__).resolve().parents[2]
# Where `cargo build` puts the debug binaries the checks run and inspect.
DEBUG_BINARIES = Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target") / "debug"
WORKER_QUEUES = {"image-worker": "image", "snapshot-worker": "snapshot", "notify-worker": "notify",
                 "persist-worker": "persist"}


@dataclass(frozen=True)
class ThirdParty:
    """A container run from someone else's image (Flower): it gets the security, resource and
    probe checks, not mediafarm's (settings file, metrics port, image built here)."""

    image: str  # repository as the manifests name it; an overlay may prefix a mirror registry
    user: str  # the `uid:gid` its image runs as (pods must name it: runAsNonRoot needs a number)
    port: int  # the port it serves on
    health: str  # the path both probes GET
    pip: str  # the PyPI package whose version must be the image's tag (the version tested)


THIRD_PARTY = {
    "flower": ThirdParty(image="mher/flower", user="1000:1000", port=5555, health="/healthcheck", pip="flower"),
}


def image_repo(image: str) -> str:
    """`[registry/]repo` of `[registry/]repo[:tag][@digest]`."""
    head, _, last = image.split("@")[0].rpartition("/")
    name = last.split(":", 1)[0]
    return f"{head}/{name}" if head else name


def image_tag(image: str) -> str | None:
    last = image.split("@")[0].rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


def third_party(image: str) -> ThirdParty | None:
    """The third-party program `image` runs, if it is one (a mirror's prefix is allowed)."""
    repo = image_repo(image)
    return next((t for t in THIRD_PARTY.values() if repo == t.image or repo.endswith("/" + t.image)), None)


def tested_version(package: str) -> str | None:
    """The version tests/py/requirements.txt pins for a PyPI package (what the tests ran)."""
    text = (ROOT / "tests/py/requirements.txt").read_text()
    m = re.search(rf"^{re.escape(package)}==(\S+)", text, re.M | re.I)
    return m.group(1) if m else None


def third_party_image_problems(image: str, t: ThirdParty, where: str) -> list[str]:
    """The image is pinned to the version the tests run (tests/py/requirements.txt)."""
    tag, tested = image_tag(image), tested_version(t.pip)
    if tag is None or tag == "latest":
        return [f"{where}: image {image} must be pinned to a version tag"]
    if tested is not None and tag != tested:
        return [f"{where}: image {image} but the tests run {t.pip}=={tested} (tests/py/requirements.txt)"]
    return []


def run(cmd: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


# The programs that read the settings file, and how each is asked to list or check them.
PROGRAMS = ("mediafarm", *WORKER_QUEUES, "snapshot-hooks")
# The image (deploy/docker/<image>.Dockerfile) that ships a program other than its namesake.
IMAGE_OF = {"snapshot-hooks": "snapshot-worker"}


def image_of(program: str) -> str:
    """The image built for `program`: its own, or the one IMAGE_OF says ships it."""
    return IMAGE_OF.get(program, program)


def program_args(program: str, cli_form: str) -> list[str]:
    """`setting-names` / `check-settings` for the CLI, `--setting-names` / `--check-settings`
    for a worker."""
    return [cli_form] if program == "mediafarm" else [f"--{cli_form}"]


def setting_names(binaries: Path = DEBUG_BINARIES) -> set[str]:
    """Every name some program reads, as the built binaries list them (each declares its own)."""
    names: set[str] = set()
    for program in PROGRAMS:
        binary = binaries / program
        if not binary.is_file():
            raise SystemExit(f"{binary} is missing: cargo build --workspace")
        r = subprocess.run([str(binary), *program_args(program, "setting-names")],
                           env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise SystemExit(f"{binary} --setting-names failed: {r.stderr.strip()}")
        names.update(line.strip() for line in r.stdout.splitlines() if line.strip())
    return names


def program_of(command: list[str], service: str = "") -> str:
    """The binary a container or service runs: its command's first word if that names one of
    ours, else the service's name if it is a worker's or snapshot-hooks, else the CLI (beat)."""
    first = Path(command[0]).name if command else ""
    if first in PROGRAMS:
        return first
    return service if service in WORKER_QUEUES or service in PROGRAMS else "mediafarm"


def exported_metrics() -> set[str]:
    """Metric names the workers export, with the suffixes Prometheus gives each type."""
    text = (ROOT / "shared/src/observe/metrics.rs").read_text()
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
    """Runs a program's own settings check (`binary` is the CLI or a worker) on a file plus
    environment, in an otherwise clean environment so this machine's MEDIAFARM_* variables play
    no part."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write(toml_text)
        f.flush()
        clean = {"PATH": "/usr/bin:/bin"} | {k: str(v) for k, v in env.items()}
        check = program_args(binary.name, "check-settings")
        r = subprocess.run([str(binary), "--config", f.name, *check], env=clean,
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


def image_user(binary: str) -> str | None:
    """The `uid:gid` the image built by deploy/docker/<binary>.Dockerfile runs as."""
    dockerfile = ROOT / "deploy/docker" / f"{binary}.Dockerfile"
    if not dockerfile.is_file():
        return None
    users = re.findall(r"^USER (\S+)$", dockerfile.read_text(), re.M)
    return users[-1] if users else None
