"""Scaling rules on a rendered kustomization (README, "Scaling per queue (KEDA)"):

1. A worker's KEDA target (`value`, messages per pod) is at least what one pod holds:
   concurrency x prefetch multiplier, each taken where the worker takes it (its `--concurrency`,
   its MEDIAFARM_* environment, the settings file of its ConfigMap, else the default of
   deploy/mediafarm.example.toml). KEDA's HTTP count includes unacknowledged messages, so a
   smaller target adds pods that get nothing.
2. Minimum replicas: scale to zero only for the workers whose cold start is measured and
   acceptable (SCALE_TO_ZERO), always with an `activationValue`; never for snapshot-worker
   (long-lived sessions). Each kustomization's minimums are the ones its documentation states
   (STATED_MINIMUMS).
3. Disruption budgets against those minimums: at a minimum of 2 or more, `minAvailable: 1`
   (a drain never evicts the last pod); at 0 or 1, `maxUnavailable: 1` (a `minAvailable: 1`
   would block every node drain while a single pod runs: the trade-off documented).
4. beat's Redis keys: every settings file names `beat_key_prefix` and `beat_lease_ttl`, and no
   two kustomizations share a prefix (two environments on one Redis would share one leader).
"""

from __future__ import annotations

import tomllib

from common import ROOT, container_args, env_value, flag, kn, matches, third_party

# Workers that may scale to zero: a job waits for a pod to start (BENCHMARKS.md, "Cold start").
SCALE_TO_ZERO = {"image-worker", "notify-worker"}
# Minimum replicas each kustomization states (README, "Scaling per queue (KEDA)").
STATED_MINIMUMS = {
    "k8s/base": {"image-worker": 1, "notify-worker": 1, "snapshot-worker": 1, "persist-worker": 1},
    "k8s/overlays/example": {"image-worker": 0, "notify-worker": 0, "snapshot-worker": 2,
                             "persist-worker": 1},
}


def default_settings() -> dict:
    """The defaults that deploy/mediafarm.example.toml sets (every setting and its default)."""
    return tomllib.loads((ROOT / "deploy/mediafarm.example.toml").read_text())


def pod_settings(d: dict, config_maps: dict[str, dict]) -> dict:
    """The settings file a Deployment's pods mount (its ConfigMap's mediafarm.toml)."""
    for v in d["spec"]["template"]["spec"].get("volumes") or []:
        data = config_maps.get((v.get("configMap") or {}).get("name"), {}).get("data") or {}
        if "mediafarm.toml" in data:
            try:
                return tomllib.loads(data["mediafarm.toml"])
            except tomllib.TOMLDecodeError:
                return {}  # reported by the workloads check
    return {}


def worker_container(d: dict) -> dict | None:
    return next((c for c in d["spec"]["template"]["spec"]["containers"]
                 if third_party(c.get("image", "")) is None), None)


def held_per_pod(c: dict, settings: dict) -> tuple[int | None, str]:
    """Unacknowledged messages one pod holds (concurrency x prefetch), and how it was derived."""
    conc = (flag(container_args(c), "--concurrency", "-c") or env_value(c, "MEDIAFARM_WORKER_CONCURRENCY")
            or settings.get("worker_concurrency"))
    prefetch = (env_value(c, "MEDIAFARM_WORKER_PREFETCH_MULTIPLIER")
                or settings.get("worker_prefetch_multiplier")
                or default_settings().get("worker_prefetch_multiplier"))
    try:
        conc_n, prefetch_n = int(str(conc)), int(str(prefetch))
    except ValueError:
        return None, f"concurrency {conc!r} x prefetch {prefetch!r}"
    return conc_n * prefetch_n, f"concurrency {conc_n} x prefetch multiplier {prefetch_n}"


def scaling_problems(label: str, objs: list[dict]) -> list[str]:
    out: list[str] = []
    deployments = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Deployment"}
    config_maps = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ConfigMap"}
    minimums: dict[str, int] = {}
    for so in (o for o in objs if o["kind"] == "ScaledObject"):
        target = so["spec"]["scaleTargetRef"]["name"]
        # KEDA's default minimum is 0: an omitted one scales to zero.
        low = int(so["spec"].get("minReplicaCount", 0))
        minimums[target] = low
        d = deployments.get(target)
        c = worker_container(d) if d else None
        for t in so["spec"]["triggers"]:
            md = t.get("metadata") or {}
            if c is not None:
                held, how = held_per_pod(c, pod_settings(d, config_maps))
                try:
                    value = int(str(md.get("value")))
                except ValueError:
                    out.append(f"{kn(so)}: value {md.get('value')!r} is not a whole number of messages")
                    continue
                if held is None:
                    out.append(f"{kn(so)}: cannot tell what a {target} pod holds ({how}): set "
                               f"--concurrency and the prefetch multiplier explicitly")
                elif value < held:
                    out.append(f"{kn(so)}: value {value} is below what one pod holds ({how} = "
                               f"{held}): KEDA would add pods that get nothing")
            if low == 0 and "activationValue" not in md:
                out.append(f"{kn(so)}: minReplicaCount 0 needs an activationValue on its trigger")
        if low == 0 and target not in SCALE_TO_ZERO:
            out.append(f"{kn(so)}: {target} must keep at least one pod "
                       f"(scale to zero only for {', '.join(sorted(SCALE_TO_ZERO))})")
    for name, d in deployments.items():
        if name not in minimums and "replicas" in d["spec"]:
            minimums[name] = int(d["spec"]["replicas"])
    for name, want in STATED_MINIMUMS.get(label, {}).items():
        if name in deployments and minimums.get(name) != want:
            out.append(f"Deployment/{name}: minimum replicas {minimums.get(name)}, "
                       f"the documentation states {want}")
    for p in (o for o in objs if o["kind"] == "PodDisruptionBudget"):
        sel = p["spec"]["selector"].get("matchLabels") or {}
        for name, d in deployments.items():
            if not matches(sel, d["spec"]["template"]["metadata"].get("labels") or {}):
                continue
            low = minimums.get(name, 1)
            spec = p["spec"]
            if low >= 2 and not (isinstance(spec.get("minAvailable"), int)
                                 and 1 <= spec["minAvailable"] < low):
                out.append(f"{kn(p)}: {name} runs at least {low} pods, so the budget must be "
                           f"minAvailable: 1 (a drain never takes the last one), not {spec}")
            if low < 2 and not (isinstance(spec.get("maxUnavailable"), int) and spec["maxUnavailable"] >= 1):
                out.append(f"{kn(p)}: {name} may run a single pod, so the budget must be "
                           f"maxUnavailable: 1 (minAvailable would block node drains), not {spec}")
    return out


def beat_prefix(objs: list[dict]) -> tuple[str | None, list[str]]:
    """The beat_key_prefix of a kustomization's settings, with what is missing."""
    out: list[str] = []
    prefixes = set()
    for cm in (o for o in objs if o["kind"] == "ConfigMap"):
        text = (cm.get("data") or {}).get("mediafarm.toml")
        if text is None:
            continue
        try:
            settings = tomllib.loads(text)
        except tomllib.TOMLDecodeError:
            continue  # reported by the workloads check
        for name in ("beat_key_prefix", "beat_lease_ttl"):
            if name not in settings:
                out.append(f"{kn(cm)}: must name {name} (beats of two environments sharing a "
                           f"Redis would otherwise share the default)")
        if "beat_key_prefix" in settings:
            prefixes.add(settings["beat_key_prefix"])
    if len(prefixes) > 1:
        out.append(f"settings files name several beat_key_prefix values: {sorted(prefixes)}")
    return (next(iter(prefixes)) if len(prefixes) == 1 else None), out


def distinct_prefix_problems(prefixes: dict[str, str]) -> list[str]:
    """No two kustomizations (environments) share a beat_key_prefix."""
    seen: dict[str, str] = {}
    out = []
    for label, prefix in prefixes.items():
        if prefix in seen:
            out.append(f"{label} and {seen[prefix]} share beat_key_prefix {prefix!r}: give each "
                       f"environment its own")
        seen.setdefault(prefix, label)
    return out
