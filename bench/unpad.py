"""`dynabert bench unpad`: the unpadded forward pass against the padded one, side by side.

Real sentences have different lengths, and a padded batch costs every row its longest row's
length. DynaBertModel's ``unpad`` (model/modeling.py) runs the dense layers on the real tokens
alone. This benchmark draws batches of real dev-set texts (SST-2 by default, read by
training/data.py from ``DYNABERT_DATA_DIR``), tokenises them with the checkpoint's tokenizer, and times both passes on
the same batches in interleaved rounds (each round runs every candidate once, in a shuffled
order, so a burst of load from other processes hits both alike). Reported per sub-network and
batch size: the median milliseconds of each pass, the speed-up, the share of real tokens in the
padded batches, and the largest difference between the two passes' logits.

    dynabert bench unpad --checkpoint models/sst2-minilm-l6 --json bench-results/unpad.json
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.latency import write_report
from training.data import TASKS

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = "models/sst2-minilm-l6"


def run_unpad(
    checkpoint: str | Path,
    *,
    data_dir: Path,
    task: str = "sst2",
    batch_sizes: tuple[int, ...] = (1, 4, 8, 16),
    subnets: list[tuple[float, float]] | None = None,
    batches: int = 20,
    rounds: int = 5,
    threads: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    from model.checkpoint import load_checkpoint
    from service.engine import Engine
    from training.data import load_split

    torch.set_num_threads(threads)
    eng = Engine(Path(checkpoint).resolve().name, load_checkpoint(checkpoint, device="cpu"))
    model = eng.model
    assert model is not None
    examples = load_split(data_dir, task, "dev")  # (a GLUE task; pairs for MRPC and RTE)
    pairs = [e.texts[1] for e in examples] if len(examples[0].texts) > 1 else None
    rows = eng.encode_texts([e.texts[0] for e in examples], pairs).rows
    keys = subnets or [(1.0, 1.0), min(eng.cfg.subnetworks(), key=lambda k: eng.cfg.flops(*k))]
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for B in batch_sizes:
        packed = [eng.pack(rng.sample(rows, B)) for _ in range(batches)]
        tensors = [
            (torch.from_numpy(i), torch.from_numpy(m), torch.from_numpy(t) if t is not None else None)
            for i, m, t in packed
        ]
        real = float(np.mean([m.mean() for _, m, _ in packed]))
        for key in keys:
            times: dict[bool, list[float]] = {False: [], True: []}
            with torch.inference_mode():
                diff = max(
                    float(
                        (
                            model(*x, width=key[0], depth=key[1], unpad=True).logits
                            - model(*x, width=key[0], depth=key[1], unpad=False).logits
                        )
                        .abs()
                        .max()
                    )
                    for x in tensors
                )
                for _ in range(rounds):
                    order = [False, True]
                    rng.shuffle(order)
                    for mode in order:
                        t0 = time.perf_counter()
                        for x in tensors:
                            model(*x, width=key[0], depth=key[1], unpad=mode)
                        times[mode].append((time.perf_counter() - t0) / len(tensors))
            padded, unpadded = statistics.median(times[False]), statistics.median(times[True])
            out.append(
                {
                    "width": key[0],
                    "depth": key[1],
                    "batch": B,
                    "real_token_share": round(real, 4),
                    "padded_ms": round(1e3 * padded, 3),
                    "unpadded_ms": round(1e3 * unpadded, 3),
                    "speedup": round(padded / unpadded, 3),
                    "max_abs_logit_diff": diff,
                }
            )
            log.info(
                "%s/%s batch %2d (%.0f%% real tokens): padded %.2f ms, unpadded %.2f ms, x%.2f",
                key[0], key[1], B, 100 * real, 1e3 * padded, 1e3 * unpadded, padded / unpadded,
            )  # fmt: skip
    return {
        "checkpoint": str(checkpoint),
        "data": f"{task} dev",
        "options": {"batch_sizes": list(batch_sizes), "batches": batches, "rounds": rounds, "seed": seed},
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "threads": threads,
            "torch": torch.__version__,
            "loadavg": list(os.getloadavg()),
        },
        "rows": out,
    }


def format_table(report: dict[str, Any]) -> str:
    lines = [
        "| sub-network | batch | real tokens | padded ms | unpadded ms | speed-up | max logit diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['width']:g}/{r['depth']:g} | {r['batch']} | {100 * r['real_token_share']:.0f}% | "
            f"{r['padded_ms']:.2f} | {r['unpadded_ms']:.2f} | x{r['speedup']:.2f} | {r['max_abs_logit_diff']:.1e} |"
        )
    return "\n".join(lines)


def parse_subnet(text: str) -> tuple[float, float]:
    """``WIDTH/DEPTH``, e.g. ``1/1`` or ``0.25/0.5`` (an argparse type)."""
    try:
        w, d = text.split("/")
        return float(w), float(d)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"a sub-network is WIDTH/DEPTH, e.g. 0.25/0.5; got {text!r}") from e


def _run(args: argparse.Namespace) -> int:
    from training.data import default_data_dir

    data = Path(args.data_dir) if args.data_dir else default_data_dir()
    report = run_unpad(
        args.checkpoint,
        data_dir=data,
        task=args.task,
        batch_sizes=tuple(args.batch_sizes),
        subnets=args.subnet or None,
        batches=args.batches,
        rounds=args.rounds,
        threads=args.threads,
        seed=args.seed,
    )
    print(format_table(report))
    if args.json:
        write_report(args.json, report)
    return 0


def register_unpad(bench_subparsers: argparse._SubParsersAction) -> None:
    p = bench_subparsers.add_parser(
        "unpad",
        help="the unpadded forward pass vs the padded one on batches of real dev-set texts",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help=f"default: {DEFAULT_CHECKPOINT}")
    p.add_argument("--data-dir", help="the data folder (default: $DYNABERT_DATA_DIR, else ../shared/data)")
    p.add_argument(
        "--task",
        default="sst2",
        choices=tuple(TASKS),
        help="the GLUE task whose dev set is read (default sst2; mrpc, rte and others are pairs)",
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16], help="default: 1 4 8 16")
    p.add_argument(
        "--subnet",
        type=parse_subnet,
        action="append",
        help="WIDTH/DEPTH, repeatable (default: the full and the smallest)",
    )
    p.add_argument("--batches", type=int, default=20, help="batches per size, drawn once (default 20)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the report as JSON here")
    p.set_defaults(func=_run)
