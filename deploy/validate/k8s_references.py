"""References between rendered objects: selectors of Services, PodDisruptionBudgets and the
ServiceMonitor, KEDA's targets, queues and authentication, beat's replicas."""

from __future__ import annotations

import re
from typing import Any

from common import WORKER_QUEUES, container_args, env_value, flag, kn, matches

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
