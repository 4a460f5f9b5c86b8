"""Every PromQL expression the deployment relies on, and a check of each against a live Prometheus.

Sources: the generated Grafana dashboards (panel targets and the label_values() of template
variables), the alert rules and the prometheus-adapter rule behind the HorizontalPodAutoscaler.
Grafana and adapter template variables are substituted first, so Prometheus sees what Grafana or
the adapter would send it.

    python deploy/check_queries.py --prometheus http://localhost:9090   # e.g. the Compose stack

exits 1 naming each expression that fails to parse or returns no data. tests/deploy/
test_prometheus_live.py runs the same check against a real Prometheus scraping the real service.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ADAPTER = DEPLOY / "k8s" / "prometheus-adapter.yaml"

# What Grafana would put in for its built-ins and our variables ("All" = the regex .*).
DEFAULT_VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "5m",
    "model": ".*",
    "instance": ".*",
    "datasource": "prometheus",
}


@dataclass(frozen=True)
class Query:
    source: str  # file and place, for messages
    expr: str  # as sent to Prometheus (variables substituted)
    must_return_data: bool = True


def substitute(expr: str, variables: Mapping[str, str]) -> str:
    """Replace Grafana's ``${name}``, ``${name:fmt}``, ``[[name]]`` and ``$name`` forms.

    An unknown variable is an error: it would reach Prometheus as a parse error anyway, but naming it
    here is clearer.
    """

    def value(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        if name not in variables:
            raise KeyError(f"unknown template variable ${name} in {expr!r}")
        return variables[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", value, expr)


def _label_values_query(query: str) -> str | None:
    """Grafana's ``label_values(metric{...}, label)`` as the PromQL that returns the same label set."""
    m = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\s*\)\s*", query, re.S)
    return f"count by ({m.group(2)}) ({m.group(1)})" if m else None


def _walk(node: object) -> Iterator[dict]:
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def dashboard_queries(path: Path, variables: Mapping[str, str]) -> list[Query]:
    dash = json.loads(path.read_text())
    out = []
    for panel in _walk(dash.get("panels", [])):
        for target in panel.get("targets", []) if isinstance(panel.get("targets"), list) else []:
            if "expr" in target:
                src = f"{path.name}: panel {panel.get('title')!r} target {target.get('refId')}"
                out.append(Query(src, substitute(target["expr"], variables)))
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        raw = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        promql = _label_values_query(raw)
        if promql is None:
            raise ValueError(f"{path.name}: variable {var['name']!r} query {raw!r} is not label_values(...)")
        out.append(Query(f"{path.name}: variable ${var['name']}", substitute(promql, variables)))
    return out


_COMPARISON = re.compile(r"==|!=|>=|<=|>|<")
_OR = re.compile(r"\bor\b")


def _top_level(expr: str, pattern: re.Pattern[str]) -> list[re.Match[str]]:
    """Matches of ``pattern`` outside (), {}, [] and string literals."""
    found, depth, quote, i = [], 0, "", 0
    while i < len(expr):
        c = expr[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "\"'`":
            quote = c
        elif c in "({[":
            depth += 1
        elif c in ")}]":
            depth -= 1
        elif depth == 0 and (m := pattern.match(expr, i)):
            found.append(m)
            i = m.end()
            continue
        i += 1
    return found


def split_comparison(expr: str) -> tuple[str, str] | None:
    """``signal OP number`` at the top level -> (signal, "OP number"); None for any other shape."""
    ops = _top_level(expr, _COMPARISON)
    if len(ops) != 1:
        return None
    op = ops[0]
    rhs = expr[op.end() :].strip()
    if not re.fullmatch(r"(bool\s+)?[-+]?[0-9.eE+]+", rhs):
        return None
    return expr[: op.start()].strip(), f"{op.group(0)} {rhs}"


def alert_signal(expr: str) -> str | None:
    """The data an alert thresholds: for ``s1 OP n1 or s2 OP n2 ...``, ``(s1) or (s2) ...``."""
    cuts = [0] + [x for m in _top_level(expr, _OR) for x in (m.start(), m.end())] + [len(expr)]
    parts = [split_comparison(expr[a:b].strip()) for a, b in zip(cuts[::2], cuts[1::2], strict=True)]
    if any(p is None for p in parts):
        return None
    if len(parts) == 1:
        return parts[0][0]
    return " or ".join(f"({p[0]})" for p in parts)


def alert_queries(path: Path) -> list[Query]:
    """Each rule's full expression (must parse; may well be empty: nothing is firing) and its signal,
    the expression without its thresholds, which must return data."""
    out = []
    for group in yaml.safe_load(path.read_text())["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("record")
            expr = " ".join(rule["expr"].split())
            out.append(Query(f"{path.name}: {name}", expr, must_return_data=False))
            signal = alert_signal(expr)
            if signal is None:
                raise ValueError(f"{path.name}: {name}: expected 'signal OP number [or ...]', got {expr!r}")
            out.append(Query(f"{path.name}: {name} (signal, thresholds removed)", signal))
    return out


def adapter_queries(path: Path, group_by: str = "instance") -> list[Query]:
    """prometheus-adapter rules from its ConfigMap, templates filled as the adapter would for one pod.

    Outside Kubernetes there are no namespace/pod labels, so the label matchers are left empty and the
    group-by is ``instance``; the metric, its aggregation and the ranges are what gets checked.
    """
    out = []
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc or doc.get("kind") != "ConfigMap":
            continue
        for key, text in doc.get("data", {}).items():
            for i, rule in enumerate(yaml.safe_load(text).get("rules", [])):
                series = re.fullmatch(r"\s*(\w+)\s*(\{.*\})?\s*", rule["seriesQuery"])
                if series is None:
                    raise ValueError(f"{path.name}: rule {i}: seriesQuery {rule['seriesQuery']!r}")
                metric = series.group(1)
                filled = (
                    rule["metricsQuery"]
                    .replace("<<.Series>>", metric)
                    .replace("<<.LabelMatchers>>", "")
                    .replace("<<.GroupBy>>", group_by)
                )
                if "<<" in filled:
                    raise ValueError(f"{path.name}: rule {i}: unfilled template in {filled!r}")
                out.append(Query(f"{path.name} {key}: rule {i} seriesQuery", metric))
                out.append(Query(f"{path.name} {key}: rule {i} metricsQuery", " ".join(filled.split())))
    return out


def all_queries(variables: Mapping[str, str] | None = None) -> list[Query]:
    variables = {**DEFAULT_VARIABLES, **(variables or {})}
    queries = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        queries += dashboard_queries(path, variables)
    queries += alert_queries(ALERTS)
    queries += adapter_queries(ADAPTER)
    return queries


def instant_query(base_url: str, expr: str, timeout: float = 10.0) -> dict:
    """POST /api/v1/query; returns Prometheus's JSON (``status`` "success" or "error")."""
    body = urllib.parse.urlencode({"query": expr}).encode()
    req = urllib.request.Request(f"{base_url.rstrip('/')}/api/v1/query", data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as e:  # 400/422 carry the parse/eval error as JSON
        return json.load(e)


def check(base_url: str, queries: list[Query]) -> list[str]:
    """Problems, one line each: a parse/evaluation error, or no data where data is required."""
    problems = []
    for query in queries:
        answer = instant_query(base_url, query.expr)
        if answer.get("status") != "success":
            problems.append(
                f"{query.source}: {answer.get('errorType')}: {answer.get('error')}\n    {query.expr}"
            )
        elif query.must_return_data and not answer["data"]["result"]:
            problems.append(f"{query.source}: no data\n    {query.expr}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", default="http://localhost:9090", help="Prometheus base URL")
    parser.add_argument("--list", action="store_true", help="only print the expressions")
    parser.add_argument(
        "--var", action="append", default=[], metavar="NAME=VALUE", help="template variable (repeatable)"
    )
    args = parser.parse_args(argv)
    queries = all_queries(dict(v.split("=", 1) for v in args.var))
    if args.list:
        for query in queries:
            print(f"# {query.source}\n{query.expr}")
        return 0
    problems = check(args.prometheus, queries)
    for line in problems:
        print(line, file=sys.stderr)
    print(f"{len(queries) - len(problems)}/{len(queries)} expressions ok", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
