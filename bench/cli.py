"""`dynabert bench`: benchmarks that print side-by-side ratios and write JSON.

dynabert bench latency   bench/latency.py: the 12 sub-networks vs the full model vs transformers
dynabert bench unpad     bench/unpad.py: the unpadded forward pass vs the padded one on real texts
dynabert bench serve     bench/serve.py: the HTTP service under load (optional part)
dynabert bench burst     bench/burst.py: impatient clients past capacity, with and without
                         taking abandoned requests out of the queue
dynabert bench overhead  bench/overhead.py: the low-load HTTP overhead of servers that differ
                         only in their settings, side by side
"""

from __future__ import annotations

import argparse
import importlib
import logging

from bench.latency import register_latency
from bench.unpad import register_unpad

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench", help="benchmarks (latency, unpad, serve, burst, overhead)", description=__doc__
    )
    sub = p.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    sub.required = True
    register_latency(sub)
    register_unpad(sub)
    try:  # the serving benchmark is its own part: its absence must not break `bench latency`
        serve = importlib.import_module("bench.serve")
    except ModuleNotFoundError as e:
        if e.name != "bench.serve":
            raise
        return
    register_serve = getattr(serve, "register_serve", None)
    if register_serve is not None:
        register_serve(sub)
        from bench.burst import register_burst
        from bench.overhead import register_overhead

        register_burst(sub)
        register_overhead(sub)
