"""Evaluate sub-networks: dev metrics, params, FLOPs at sequence length 128 and measured CPU
latency at batch 1, in the eval.json shape of docs/CONTRACTS.md."""

from __future__ import annotations

import copy
import logging
import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from model.modeling import DynaBertModel
from training.tasks import TaskData

log = logging.getLogger(__name__)

LATENCY_SEQ_LEN = 128


def parse_subnetworks(spec: str, available: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """``all`` or ``W:D,W:D``; every pair must be a trained sub-network."""
    if spec.strip() == "all":
        return list(available)
    out = []
    for item in spec.split(","):
        try:
            w, d = (float(x) for x in item.strip().split(":"))
        except ValueError:
            raise ValueError(f"sub-network {item!r} is not WIDTH:DEPTH (e.g. 0.5:0.75)") from None
        if (w, d) not in set(available):
            raise ValueError(f"sub-network {w}:{d} is not in the trained grid {list(available)}")
        out.append((w, d))
    return out


@torch.no_grad()
def cpu_latency_ms(model: DynaBertModel, width: float, depth: float, repeats: int = 20) -> float:
    """Median wall time (ms) of one forward at batch 1, sequence length 128, on the CPU."""
    model.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (1, LATENCY_SEQ_LEN), generator=g)
    for _ in range(2):
        model(ids, width=width, depth=depth)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        model(ids, width=width, depth=depth)
        times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 3)


def evaluate_subnetworks(
    model: DynaBertModel,
    data: TaskData,
    subnetworks: Sequence[tuple[float, float]] | None = None,
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    latency_repeats: int = 20,
    split: str = "dev",
) -> list[dict[str, Any]]:
    """One eval.json entry per sub-network (the whole trained grid by default)."""
    cfg = model.cfg
    subs = list(subnetworks) if subnetworks is not None else cfg.subnetworks()
    cpu_model = model if str(device) == "cpu" else copy.deepcopy(model).to("cpu")
    results = []
    for w, d in subs:
        t0 = time.perf_counter()
        values = data.evaluate(model, w, d, batch_size, device)
        metric = cfg.task.metric
        entry = {
            "width": w,
            "depth": d,
            "params": cfg.params(w, d),
            "flops": cfg.flops(w, d, seq_len=LATENCY_SEQ_LEN),
            "metric": metric,
            "value": values[metric],
            "metrics": values,
            "split": split,
            "examples": int(data.num_dev),
            "latency_ms_cpu": cpu_latency_ms(cpu_model, w, d, latency_repeats) if latency_repeats else None,
        }
        log.info(
            "eval w=%.2f d=%.2f %s=%.4f (%.1fs, %s ms at batch 1 x 128 tokens on CPU)",
            w,
            d,
            metric,
            entry["value"],
            time.perf_counter() - t0,
            entry["latency_ms_cpu"],
        )
        results.append(entry)
    return results


def average(results: Sequence[dict[str, Any]]) -> float:
    """Mean headline metric over entries."""
    return float(np.mean([r["value"] for r in results])) if results else float("nan")
