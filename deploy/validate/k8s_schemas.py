"""Schema validation of one Kubernetes object: core kinds with kubernetes-validate's bundled
schemas, KEDA and Prometheus Operator kinds with the models generated from their CRDs. Unknown
fields are errors either way, as with the API server's strict field validation."""

from __future__ import annotations

from typing import Any

# Oldest and newest Kubernetes minor the manifests are checked against.
K8S_VERSIONS = ("1.29.0", "1.37.0")


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
