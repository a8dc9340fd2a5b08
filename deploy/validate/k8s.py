"""k8s/: render the base and every overlay with `kubectl kustomize`, then validate each object
(schemas, the worker contract, references, settings values) and the Secret shapes."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from common import ROOT, env_problems, kn, run
from k8s_references import reference_problems
from k8s_scaling import beat_prefix, distinct_prefix_problems, scaling_problems
from k8s_schemas import crd_models, validate_object
from k8s_workloads import settings_value_problems, workload_problems
from report import Report


def render(kustomization_dir: Path) -> tuple[list[dict], list[str]]:
    r = run(["kubectl", "kustomize", str(kustomization_dir)])
    if r.returncode != 0:
        return [], [f"kubectl kustomize failed: {r.stderr.strip()[:800]}"]
    return [o for o in yaml.safe_load_all(r.stdout) if o], []


def check_k8s(report: Report, known: set[str], binaries: Path) -> None:
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
    prefixes: dict[str, str] = {}
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
        report.check(f"{label}: settings values per container (each program's own check)",
                     settings_value_problems(objs, binaries))
        report.check(f"{label}: scaling (KEDA targets >= concurrency x prefetch, minimums, PDBs)",
                     scaling_problems(label, objs))
        prefix, problems = beat_prefix(objs)
        report.check(f"{label}: beat_key_prefix and beat_lease_ttl named", problems)
        if prefix is not None:
            prefixes[label] = prefix
        for kind in ("Deployment", "ScaledObject", "TriggerAuthentication", "PodDisruptionBudget",
                     "ServiceMonitor", "ConfigMap", "Service"):
            if not any(o["kind"] == kind for o in objs):
                report.check(f"{label}: has a {kind}", [f"no {kind} rendered"])
    report.check("k8s: one beat_key_prefix per environment", distinct_prefix_problems(prefixes))
