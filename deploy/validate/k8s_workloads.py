"""The contract on rendered Deployments. Every container: restricted security context,
resources, /tmp, Secret keys. mediafarm's: probes on /healthz and /readyz, grace period,
settings names and values, queues, the image built for its binary. A third-party container
(Flower, common.THIRD_PARTY): its pinned image, user and health probes; with Flower present,
every worker sends Celery events."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

from common import (THIRD_PARTY, WORKER_QUEUES, ThirdParty, check_settings,
                    container_args, env_problems, env_value, flag, image_of, image_user, kn,
                    literal_mediafarm_env, program_of, settings_problems, third_party,
                    third_party_image_problems)

# A Kubernetes resource quantity ("500m", "2", "1.5Gi", "128974848", "129e6"); the OpenAPI
# schema types it only as int-or-string, the API server parses it.
QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)(([KMGTPE]i)|[numkMGTPE]|[eE][+-]?\d+)?$")


def shutdown_grace(settings: dict, c: dict) -> float:
    env = env_value(c, "MEDIAFARM_WORKER_SHUTDOWN_GRACE")
    return float(env if env is not None else settings.get("worker_shutdown_grace", 30))


def sends_events(c: dict, settings: dict) -> bool:
    """Whether a worker container sends Celery events: its environment over its settings file
    (the environment's booleans as the settings reader takes them)."""
    env = env_value(c, "MEDIAFARM_WORKER_SEND_TASK_EVENTS")
    if env is not None:
        return env.strip().lower() in ("true", "1", "yes", "on")
    return settings.get("worker_send_task_events") is True


def container_problems(c: dict, volumes: dict[str, dict], secret_keys: dict[str, set[str]],
                       known: set[str], cw: str) -> list[str]:
    """What every container must do, ours or not: restricted security context, resources,
    a writable /tmp beside the read-only root, mounts and Secret keys that exist."""
    out: list[str] = []
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
    out.extend(env_problems([e["name"] for e in c.get("env") or []], cw, known))
    for e in c.get("env") or []:
        ref = (e.get("valueFrom") or {}).get("secretKeyRef")
        if ref and ref.get("key") not in secret_keys.get(ref.get("name"), set()):
            out.append(f"{cw}: env {e['name']} refers to {ref.get('name')}/{ref.get('key')}, "
                       f"which k8s/secret.example.yaml does not define")
    return out


def third_party_problems(c: dict, t: ThirdParty, psc: dict, cw: str) -> list[str]:
    """A third-party container (Flower): its image pinned to the version tested, the pod's user
    the image's, both probes on its health path and port."""
    out = third_party_image_problems(c.get("image", ""), t, cw)
    if f"{psc.get('runAsUser')}:{psc.get('runAsGroup')}" != t.user:
        out.append(f"{cw}: runs as {psc.get('runAsUser')}:{psc.get('runAsGroup')}, "
                   f"its image's user is {t.user}")
    ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
    if t.port not in ports.values():
        out.append(f"{cw}: needs container port {t.port}")
    for probe in ("livenessProbe", "readinessProbe"):
        get = (c.get(probe) or {}).get("httpGet") or {}
        port = get.get("port")
        if get.get("path") != t.health or ports.get(port, port) != t.port:
            out.append(f"{cw}: {probe} must GET {t.health} on port {t.port}")
    return out


def mediafarm_problems(name: str, c: dict, pod: dict, settings: dict, cw: str) -> list[str]:
    """A mediafarm container: the image built for the binary it runs, that image's user, the
    settings file, metrics and probes, its queue and a grace period longer than the drain."""
    out: list[str] = []
    psc = pod.get("securityContext") or {}
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts") or []}
    args = container_args(c)
    # The image is the one built for the binary the container runs (deploy/docker).
    image_repo = c.get("image", "").rsplit("/", 1)[-1].split(":")[0]
    program = Path(args[0]).name if args else ""
    if image_repo != image_of(program):
        out.append(f"{cw}: runs {program or 'no command'} from image {c.get('image')}")
    user = image_user(image_of(program))
    if user is not None and user != f"{psc.get('runAsUser')}:{psc.get('runAsGroup')}":
        out.append(f"{cw}: runs as {psc.get('runAsUser')}:{psc.get('runAsGroup')}, "
                   f"its image's USER is {user}")
    if flag(args, "--config") != "/etc/mediafarm/mediafarm.toml" or "/etc/mediafarm" not in mounts:
        out.append(f"{cw}: must read --config /etc/mediafarm/mediafarm.toml from the settings ConfigMap")
    if name in WORKER_QUEUES:
        queue = flag(args, "--queues", "-Q")
        if queue != WORKER_QUEUES[name]:
            out.append(f"{cw}: consumes {queue!r}, expected queue {WORKER_QUEUES[name]!r}")
    # Workers and beat serve /metrics, /healthz and /readyz on metrics_addr, whose one source is
    # the settings file (the images set no MEDIAFARM_METRICS_ADDR): the `metrics` container
    # port and both probes follow its port.
    if name in WORKER_QUEUES or name == "mediafarm-beat":
        ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
        addr = (flag(args, "--metrics-addr") or env_value(c, "MEDIAFARM_METRICS_ADDR")
                or str(settings.get("metrics_addr", "")))
        host, _, port_text = addr.rpartition(":")
        port = int(port_text) if port_text.isdigit() else None
        if host not in ("0.0.0.0", "[::]") or not port:
            out.append(f"{cw}: metrics_addr is {addr!r}; probes need every interface and a fixed "
                       f"port (0.0.0.0:<port>)")
        elif ports.get("metrics") != port:
            out.append(f"{cw}: container port `metrics` is {ports.get('metrics')}, "
                       f"metrics_addr's port is {port}")
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = (c.get(probe) or {}).get("httpGet") or {}
            probe_port = ports.get(get.get("port"), get.get("port"))
            if get.get("path") != path or port is None or probe_port != port:
                out.append(f"{cw}: {probe} must GET {path} on metrics_addr's port {port}, "
                           f"not {get.get('port')!r}")
    # snapshot-hooks serves /healthz on the address of its --addr (or hooks_addr): both probes
    # and the `hooks` container port follow that port.
    if program == "snapshot-hooks":
        ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
        addr = flag(args, "--addr") or env_value(c, "MEDIAFARM_HOOKS_ADDR") or str(settings.get("hooks_addr", ""))
        host, _, port_text = addr.rpartition(":")
        port = int(port_text) if port_text.isdigit() else None
        if host not in ("0.0.0.0", "[::]") or not port:
            out.append(f"{cw}: listens on {addr!r}; the Service needs every interface and a fixed port")
        elif ports.get("hooks") != port:
            out.append(f"{cw}: container port `hooks` is {ports.get('hooks')}, it listens on {port}")
        for probe in ("livenessProbe", "readinessProbe"):
            get = (c.get(probe) or {}).get("httpGet") or {}
            if get.get("path") != "/healthz" or ports.get(get.get("port"), get.get("port")) != port:
                out.append(f"{cw}: {probe} must GET /healthz on port {port}")
    if name == "notify-worker":
        tdir = str(settings.get("notify_template_dir", "./templates"))
        if tdir not in mounts:
            out.append(f"{cw}: notify_template_dir {tdir} is not a mounted volume")
    if name in WORKER_QUEUES:
        grace = pod.get("terminationGracePeriodSeconds", 30)
        drain = shutdown_grace(settings, c)
        if grace <= drain:
            out.append(f"{cw}: terminationGracePeriodSeconds {grace} must exceed "
                       f"worker_shutdown_grace {drain:g}")
    return out


def workload_problems(objs: list[dict], secret_keys: dict[str, set[str]], known: set[str]) -> list[str]:
    """Every Deployment: security, resources, probes, settings, secrets, grace period; a
    third-party container (Flower) the general checks and its own, not mediafarm's."""
    out: list[str] = []
    by_kind: dict[str, dict[str, dict]] = {}
    for o in objs:
        by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o
    config_maps = by_kind.get("ConfigMap", {})
    for name, cm in config_maps.items():
        for fname, text in (cm.get("data") or {}).items():
            if fname.endswith(".toml"):
                out.extend(settings_problems(text, f"ConfigMap/{name} {fname}", known))
    deployments = by_kind.get("Deployment", {})
    # Flower shows tasks only from workers that send Celery's events.
    flower = any(third_party(c.get("image", "")) is THIRD_PARTY["flower"]
                 for d in deployments.values() for c in d["spec"]["template"]["spec"]["containers"])
    for name, d in deployments.items():
        where = f"Deployment/{name}"
        pod = d["spec"]["template"]["spec"]
        psc = pod.get("securityContext") or {}
        if not psc.get("runAsNonRoot") or not psc.get("runAsUser"):
            out.append(f"{where}: pod must set runAsNonRoot and a numeric runAsUser")
        if (psc.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
            out.append(f"{where}: pod must set seccompProfile RuntimeDefault (restricted Pod Security)")
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
            out.extend(container_problems(c, volumes, secret_keys, known, cw))
            t = third_party(c.get("image", ""))
            if t is not None:
                out.extend(third_party_problems(c, t, psc, cw))
            else:
                out.extend(mediafarm_problems(name, c, pod, settings, cw))
            if name in WORKER_QUEUES and flower and not sends_events(c, settings):
                out.append(f"{cw}: Flower runs, so the worker must send events "
                           f"(MEDIAFARM_WORKER_SEND_TASK_EVENTS=true or worker_send_task_events)")
    return out


def settings_value_problems(objs: list[dict], binaries: Path) -> list[str]:
    """Each container's settings file (its ConfigMap) with its literal MEDIAFARM_* values,
    through the check of the program the container runs."""
    out: list[str] = []
    cms = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ConfigMap"}
    for d in (o for o in objs if o["kind"] == "Deployment"):
        pod = d["spec"]["template"]["spec"]
        texts = [cms[v["configMap"]["name"]]["data"]["mediafarm.toml"] for v in pod.get("volumes") or []
                 if "configMap" in v and "mediafarm.toml" in (cms.get(v["configMap"]["name"], {}).get("data") or {})]
        for c in pod["containers"]:
            if third_party(c.get("image", "")) is not None:
                continue  # reads no mediafarm settings
            program = binaries / program_of(list(c.get("command") or []), c["name"])
            for text in texts:
                out.extend(check_settings(program, text, literal_mediafarm_env(c.get("env")),
                                          f"{kn(d)} container {c['name']} ({program.name})"))
    return out
