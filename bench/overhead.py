"""`dynabert bench overhead`: the low-load HTTP overhead of servers that differ only in their
settings, side by side.

Each variant is a server started with its own ``DYNABERT_*`` environment (``--variant
NAME:KEY=VALUE,...``). For every sub-network asked for (``--subnet W/D``), the variants take turns
in rounds of ``--requests`` requests pinned to it, one at a time from a blocking socket client
(bench/transport.py), so that a drift of the host's speed falls on all of them alike. Per round it
records the overhead, p50 end to end minus the p50 tokenise + forward pass the server reports in
Server-Timing (the measure of ``dynabert bench serve``), and the server's CPU per request:
its own process (event loop, HTTP, policy) and its inference worker.

The default pair is ``DYNABERT_BUSY_POLL_MS`` at 0 (the default) and 50: the measurement behind
turning polling off by default (docs/RESULTS.md, 2026-12-03).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import re
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.serve import DEFAULT_CHECKPOINT, LOW_LOAD_WARMUP, Server, _low_load_raw, load_texts
from bench.unpad import parse_subnet

log = logging.getLogger(__name__)

_ENV_KEY = re.compile(r"^DYNABERT_[A-Z0-9_]+$")
DEFAULT_VARIANTS = ("polling-off:DYNABERT_BUSY_POLL_MS=0", "polling-on:DYNABERT_BUSY_POLL_MS=50")


@dataclass(frozen=True)
class Variant:
    name: str
    env: dict[str, str]


def parse_variant(spec: str) -> Variant:
    """``NAME:KEY=VALUE,KEY=VALUE`` (``NAME:`` for the defaults); keys are DYNABERT_ settings."""
    name, sep, rest = spec.partition(":")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise argparse.ArgumentTypeError(
            f"variant {spec!r}: expected NAME:KEY=VALUE,... (NAME: letters, digits, ._-)"
        )
    env: dict[str, str] = {}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not _ENV_KEY.match(key):
            raise argparse.ArgumentTypeError(f"variant {spec!r}: {item!r} is not DYNABERT_SETTING=VALUE")
        env[key] = value
    return Variant(name, env)


def summarise(rounds: list[dict[str, float]]) -> dict[str, float]:
    """The median overhead over a variant's rounds (a round is one p50), and the means of the rest."""
    return {
        "overhead_ms": statistics.median(r["overhead_ms"] for r in rounds),
        "e2e_p50_ms": statistics.median(r["e2e_p50_ms"] for r in rounds),
        "forward_p50_ms": statistics.median(r["forward_p50_ms"] for r in rounds),
        "tokenize_forward_p50_ms": statistics.median(r["tokenize_forward_p50_ms"] for r in rounds),
        "front_cpu_ms": statistics.fmean(r["front_cpu_ms"] for r in rounds),
        "worker_cpu_ms": statistics.fmean(r["worker_cpu_ms"] for r in rounds),
    }


def run_overhead(
    checkpoint: Path,
    variants: list[Variant],
    subnets: list[tuple[float, float]],
    rounds: int,
    requests: int,
    logs_dir: Path,
) -> dict[str, Any]:
    text = load_texts(random.Random(0))[0]
    base = {"DYNABERT_REQUEST_LOG": "false"}
    logs_dir.mkdir(parents=True, exist_ok=True)
    servers: dict[str, Server] = {}
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    try:
        for v in variants:
            server = Server(checkpoint, {**base, **v.env}, logs_dir / f"server-{v.name}.log")
            servers[v.name] = server.__enter__()
        for w, d in subnets:
            key = f"{w:g}/{d:g}"
            results[key] = {v.name: [] for v in variants}
            for k in range(rounds):
                for v in variants:  # the variants take turns, round by round
                    server = servers[v.name]
                    (f0, k0), t0 = server.cpu_s(), time.perf_counter()
                    out = _low_load_raw(server, text, (w, d), requests)
                    f1, k1 = server.cpu_s()
                    sent = requests + LOW_LOAD_WARMUP  # the warm-up requests cost the same
                    row = {
                        "overhead_ms": out["overhead_ms"],
                        "e2e_p50_ms": out["e2e_p50_ms"],
                        "forward_p50_ms": out["server_forward_p50_ms"],
                        "tokenize_forward_p50_ms": out["basis_p50_ms"],
                        "front_cpu_ms": 1e3 * (f1 - f0) / sent,
                        "worker_cpu_ms": 1e3 * (k1 - k0) / sent,
                    }
                    results[key][v.name].append(row)
                    log.info(
                        "%s round %d %-12s overhead %.3f ms (e2e %.2f, tokenise + forward %.2f), CPU per request "
                        "%.2f + %.2f ms, %.1f s",
                        key, k + 1, v.name, row["overhead_ms"], row["e2e_p50_ms"], row["tokenize_forward_p50_ms"],
                        row["front_cpu_ms"], row["worker_cpu_ms"], time.perf_counter() - t0,
                    )  # fmt: skip
    finally:
        for server in servers.values():
            server.stop()
    summary = {key: {name: summarise(rs) for name, rs in per.items()} for key, per in results.items()}
    return {
        "checkpoint": str(checkpoint),
        "variants": {v.name: v.env for v in variants},
        "rounds": rounds,
        "requests": requests,
        "results": results,
        "summary": summary,
    }


def markdown(result: dict[str, Any]) -> str:
    names = list(result["variants"])
    first = names[0]
    lines = [
        f"Low-load overhead, {result['rounds']} alternating rounds of {result['requests']} requests "
        "(p50 end to end - p50 tokenise + forward, median over rounds; CPU per request, mean):",
        "",
        "| sub-network | variant | overhead | vs " + first + " | forward | front CPU | worker CPU |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, per in result["summary"].items():
        ref = per[first]["overhead_ms"]
        for name in names:
            s = per[name]
            lines.append(
                f"| {key} | {name} | {s['overhead_ms']:.3f} ms | {s['overhead_ms'] - ref:+.3f} ms | "
                f"{s['forward_p50_ms']:.2f} ms | {s['front_cpu_ms']:.2f} ms | {s['worker_cpu_ms']:.2f} ms |"
            )
    return "\n".join(lines)


def run_overhead_bench(args: argparse.Namespace) -> int:
    variants = args.variant or [parse_variant(s) for s in DEFAULT_VARIANTS]
    if len({v.name for v in variants}) != len(variants) or len(variants) < 2:
        raise SystemExit("--variant: at least two, with different names")
    if args.rounds < 1 or args.requests < 1:
        raise SystemExit("--rounds and --requests: at least 1")
    subnets = args.subnet or [(1.0, 1.0), (0.25, 0.5)]
    with contextlib.ExitStack() as stack:  # the logs where asked, else in a folder deleted after
        logs = args.keep_logs or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="dynabert-overhead-"))
        )
        result = run_overhead(Path(args.checkpoint), variants, subnets, args.rounds, args.requests, logs)
    print(markdown(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def register_overhead(bench_subparsers: Any) -> None:
    """Add `dynabert bench overhead` to the `bench` subcommand's subparsers."""
    p = bench_subparsers.add_parser(
        "overhead",
        help="the low-load HTTP overhead of servers that differ in their settings, side by side",
        description=(__doc__ or "").split("\n\n")[0],
    )
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="a classification checkpoint")
    p.add_argument(
        "--variant",
        type=parse_variant,
        action="append",
        help="NAME:DYNABERT_KEY=VALUE,... (repeat; the first is the reference; default: "
        + " and ".join(DEFAULT_VARIANTS)
        + ")",
    )
    p.add_argument(
        "--subnet",
        type=parse_subnet,
        action="append",
        help="WIDTH/DEPTH to pin (repeat; default 1/1 and 0.25/0.5)",
    )
    p.add_argument("--rounds", type=int, default=5, help="rounds per sub-network (default 5)")
    p.add_argument("--requests", type=int, default=200, help="requests per round (default 200)")
    p.add_argument("--keep-logs", type=Path, default=None, metavar="DIR", help="keep the servers' logs here")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.set_defaults(func=run_overhead_bench)
