"""deploy/grafana/dashboards: every query parses as PromQL and uses exported metrics only."""

from __future__ import annotations

import json
import re

from common import ROOT, exported_metrics
from report import Report


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
