"""`dynabert bench burst`: a burst past capacity from clients that give up, then light load; the
same run against a server that takes abandoned requests out of its queue and one that does not
(``DYNABERT_CANCEL_ON_DISCONNECT``), side by side.

Clients time out under overload (a proxy's or an SDK's timeout) and often retry. A server that
computes every request it queued keeps working for clients that have left, and the requests that
arrive after the burst wait behind that dead work: seconds, with a long queue. The benchmark offers
``--burst-load`` x capacity for ``--burst-s`` seconds, then ``--after-load`` x capacity for
``--after-s`` seconds (Poisson arrivals, open loop, the same schedule for both servers), every
client giving up after ``--client-timeout-ms``. It reports, per second after the burst, the share of
requests answered within the client's timeout and their p50, the inputs each server ran forward
passes on (``dynabert_batch_size_sum``), and how many requests each withdrew
(``dynabert_client_closed_total``).

The policy is ``fixed`` on the full network by default, with a queue bound of ``--max-queue``: the
case where a queue builds up. ``sla`` keeps its queue short by routing to smaller sub-networks, so
it has less dead work to drop.

``--drop-by timeout-header`` compares the other way a server learns that an answer is no longer
wanted: both servers ignore hang-ups (as behind a proxy that keeps its upstream connections open),
and the clients of one of them announce their timeout in ``X-Request-Timeout-Ms``; that server
drops what would come too late (``dynabert_deadline_exceeded_total``), the other computes it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import re
import tempfile
from pathlib import Path
from typing import Any

from bench.serve import (
    DEFAULT_CHECKPOINT,
    BenchConfig,
    ClientPool,
    Record,
    Server,
    _loop_factory,
    _measure_capacity,
    _read_grid,
    load_texts,
    open_loop,
    percentile,
    poisson_schedule,
    policy_spec,
    timeout_header,
)


def _counter(text: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include ``labels`` in a Prometheus exposition."""
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})?\s+(\S+)", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


def windows(records: list[Record], start_s: float, end_s: float, width_s: float = 1.0) -> list[dict]:
    """Per ``width_s`` window of scheduled send times from ``start_s``: requests, the share answered
    (200) within the client's timeout, and the p50 of those answers."""
    out = []
    t = start_s
    while t < end_s - 1e-9:
        seg = [r for r in records if t <= r.sched_s < t + width_s]
        ok = [r.latency_ms for r in seg if r.status == 200]
        out.append(
            {
                "from_s": round(t - start_s, 3),
                "requests": len(seg),
                "answered": len(ok) / len(seg) if seg else None,
                "p50_ms": percentile(ok, 50),
            }
        )
        t += width_s
    return out


async def _one_server(
    checkpoint: Path, name: str, env: dict[str, str], headers: dict[str, str] | None, tmp: Path,
    schedule: list[float], texts: list[str], args: Any, split_s: float,
) -> dict[str, Any]:  # fmt: skip
    with Server(checkpoint, env, tmp / f"server-{name}.log") as server:
        async with ClientPool() as client:
            warm = poisson_schedule(10.0, 1.0, random.Random(1), 1000)
            await open_loop(client, server.base_url, warm, texts, budget_ms=args.budget_ms, timeout_s=5.0)
            before = (await client.get(server.base_url + "/metrics")).text
            records, wall = await open_loop(
                client, server.base_url, schedule, texts, budget_ms=args.budget_ms,
                timeout_s=args.client_timeout_ms / 1e3, extra_headers=headers,
            )  # fmt: skip
            await asyncio.sleep(0.5)
            after = (await client.get(server.base_url + "/metrics")).text

    def delta(metric: str, **labels: str) -> float:
        return _counter(after, metric, **labels) - _counter(before, metric, **labels)

    burst = [r for r in records if r.sched_s < split_s]
    return {
        "server": name,
        "burst_requests": len(burst),
        "burst_answered": sum(r.status == 200 for r in burst) / max(1, len(burst)),
        "after": windows(records, split_s, max(schedule) + 1e-9 if schedule else split_s),
        "inputs_run": delta("dynabert_batch_size_sum"),
        "withdrawn_queued": delta("dynabert_client_closed_total", stage="queued")
        + delta("dynabert_deadline_exceeded_total", stage="queued"),
        "refused_admission": delta("dynabert_deadline_exceeded_total", stage="admission"),
        "dropped_running": delta("dynabert_client_closed_total", stage="running")
        + delta("dynabert_deadline_exceeded_total", stage="running"),
        "wall_s": wall,
    }


def variants(drop_by: str, timeout_ms: float) -> list[tuple[str, dict[str, str], dict[str, str] | None]]:
    """The two compared servers, the one that drops unwanted work first: (name, settings, headers
    its clients send)."""
    if drop_by == "hang-up":
        return [
            ("cancel", {"DYNABERT_CANCEL_ON_DISCONNECT": "true"}, None),
            ("no-cancel", {"DYNABERT_CANCEL_ON_DISCONNECT": "false"}, None),
        ]
    deaf = {"DYNABERT_CANCEL_ON_DISCONNECT": "false"}
    return [("timeout-header", deaf, timeout_header(timeout_ms)), ("no-header", deaf, None)]


async def _run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    checkpoint = Path(args.checkpoint).resolve()
    widths, depths, _ = _read_grid(checkpoint)
    rng = random.Random(args.seed)
    texts = load_texts(rng)
    spec = policy_spec("fixed-full" if args.policy == "fixed" else "sla", widths, depths)
    base = {**spec.env, "DYNABERT_MAX_QUEUE": str(args.max_queue)}
    capacity = args.capacity
    if capacity is None:
        with Server(checkpoint, {**base, "DYNABERT_CANCEL_ON_DISCONNECT": "true"}, tmp / "probe.log") as s:
            async with ClientPool() as client:
                cfg = BenchConfig(
                    checkpoint=checkpoint,
                    probe_s=1.0 if args.quick else 3.0,
                    probe_concurrency=16,
                    capacity_rounds=1 if args.quick else 3,
                )
                pin = None if spec.subnet is not None else (max(widths), max(depths))
                capacity = (await _measure_capacity(client, s, texts, cfg, pin))["rps"]
    burst = poisson_schedule(args.burst_load * capacity, args.burst_s, rng, 100_000)
    light = poisson_schedule(args.after_load * capacity, args.after_s, rng, 100_000)
    schedule = burst + [args.burst_s + t for t in light]
    runs = []
    for name, env, headers in variants(args.drop_by, args.client_timeout_ms):
        runs.append(
            await _one_server(
                checkpoint, name, {**base, **env}, headers, tmp, schedule, texts, args, args.burst_s
            )
        )
    return {
        "config": {
            "checkpoint": str(checkpoint), "policy": args.policy, "max_queue": args.max_queue,
            "drop_by": args.drop_by,
            "capacity_rps": capacity, "burst_load": args.burst_load, "burst_s": args.burst_s,
            "after_load": args.after_load, "after_s": args.after_s,
            "client_timeout_ms": args.client_timeout_ms, "budget_ms": args.budget_ms,
        },
        "runs": runs,
    }  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    drops, keeps = result["runs"]  # the server that drops unwanted work, the one that does not
    a_name, b_name = drops["server"], keeps["server"]
    how = (
        "the server learns of it from the hang-up"
        if cfg.get("drop_by", "hang-up") == "hang-up"
        else "the servers ignore hang-ups; one gets the timeout in X-Request-Timeout-Ms"
    )
    lines = [
        f"Policy {cfg['policy']}, queue bound {cfg['max_queue']}, capacity {cfg['capacity_rps']:.1f} req/s; "
        f"a {cfg['burst_s']:g} s burst at {cfg['burst_load']:g}x, then {cfg['after_s']:g} s at "
        f"{cfg['after_load']:g}x; clients give up after {cfg['client_timeout_ms']:g} ms ({how}).",
        "",
        f"| after the burst | answered ({a_name}) | p50 ms ({a_name}) | answered ({b_name}) | p50 ms ({b_name}) |",
        "|---|---|---|---|---|",
    ]

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.0f}%"

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x:.0f}"

    for a, b in zip(drops["after"], keeps["after"], strict=True):
        lines.append(
            f"| {a['from_s']:g}-{a['from_s'] + 1:g} s ({a['requests']} requests) | {pct(a['answered'])} "
            f"| {ms(a['p50_ms'])} | {pct(b['answered'])} | {ms(b['p50_ms'])} |"
        )
    lines += [
        "",
        f"During the burst: {pct(drops['burst_answered'])} answered in time ({a_name}), "
        f"{pct(keeps['burst_answered'])} ({b_name}). Inputs run through the model: {drops['inputs_run']:.0f} "
        f"({a_name}: {drops['withdrawn_queued']:.0f} requests withdrawn unrun, "
        f"{drops.get('refused_admission', 0):.0f} refused at admission, "
        f"{drops['dropped_running']:.0f} answers dropped), {keeps['inputs_run']:.0f} ({b_name}) "
        f"(ratio {keeps['inputs_run'] / max(drops['inputs_run'], 1):.2f}x).",
    ]
    return "\n".join(lines)


def run_burst_bench(args: argparse.Namespace) -> int:
    for flag in ("burst_load", "burst_s", "after_load", "after_s", "client_timeout_ms", "budget_ms"):
        if not getattr(args, flag) > 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)!r}")
    if args.capacity is not None and not args.capacity > 0:
        raise ValueError(f"--capacity must be > 0 req/s, got {args.capacity!r}")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="dynabert-bench-burst-") as tmp:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            result = runner.run(_run(args, Path(tmp)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    print(markdown(result))
    return 0


def register_burst(bench_subparsers: Any) -> None:
    """Add `dynabert bench burst` to the `bench` subcommand's subparsers."""
    p = bench_subparsers.add_parser(
        "burst",
        help="a burst of impatient clients past capacity, then light load: with and without "
        "taking abandoned requests out of the queue",
        description=(__doc__ or "").split("\n\n")[0],
    )
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="a classification checkpoint")
    p.add_argument("--policy", choices=("fixed", "sla"), default="fixed", help="fixed: the full network")
    p.add_argument("--max-queue", type=int, default=400, help="the servers' DYNABERT_MAX_QUEUE")
    p.add_argument(
        "--capacity", type=float, default=None, help="req/s the loads multiply (default: measured)"
    )
    p.add_argument("--burst-load", type=float, default=3.0)
    p.add_argument("--burst-s", type=float, default=2.0)
    p.add_argument("--after-load", type=float, default=0.25)
    p.add_argument("--after-s", type=float, default=6.0)
    p.add_argument("--client-timeout-ms", type=float, default=300.0)
    p.add_argument(
        "--drop-by",
        choices=("hang-up", "timeout-header"),
        default="hang-up",
        help="how the server learns an answer is no longer wanted: the client's hang-up (servers with "
        "and without DYNABERT_CANCEL_ON_DISCONNECT), or X-Request-Timeout-Ms (servers that ignore "
        "hang-ups; clients with and without the header)",
    )
    p.add_argument("--budget-ms", type=float, default=50.0, help="X-Latency-Budget-Ms of every request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a shorter capacity probe (tests)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.set_defaults(func=run_burst_bench)
