"""`dynabert bench latency`: latency of the 12 sub-networks, side by side with transformers, on
the CPU (the default) or on a GPU (``--device cuda``: each timed call waits for the GPU's queue).

For each batch size (1 and 8 by default, sequence length 128) it times every sub-network of
the trained grid and, in the same interleaved rounds, transformers' eager ``BertModel``
(or ``RobertaModel``) holding the very same weights. Reported per sub-network: median latency,
parameters, FLOPs per sequence, speedup over our full model, the FLOP ratio and
speedup / FLOP ratio (1.0 = the sub-network is exactly as much faster as it is smaller).

Method: a fixed thread count (``torch.set_num_threads``), warm-up calls, then rounds that run
every candidate once in a shuffled order, so a burst of load from other processes hits all
candidates alike; medians over rounds. Ratios measured this way stay meaningful on a shared
machine even when absolute times do not.

Models: ``--shape base`` (BERT-base: 12 layers, hidden 768, 12 heads, FFN 3072; random weights),
``--shape minilm`` (the real all-MiniLM-L6-v2 weights), or ``--checkpoint DIR``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from model.config import DynaBertConfig, TaskSpec
from model.modeling import DynaBertModel
from service.profile import gpu_name

log = logging.getLogger(__name__)

BENCH_TASK = TaskSpec(type="classification", name="bench", labels=("0", "1"))
BASE_SHAPE = dict(
    vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12, ffn_size=3072, max_positions=512
)


@dataclass(frozen=True)
class LatencyOptions:
    threads: int = 2
    seq_len: int = 128
    batch_sizes: tuple[int, ...] = (1, 8)
    repeats: int = 10  # timed rounds; every candidate runs once per round
    warmup: int = 2  # untimed calls per candidate before the rounds
    seed: int = 0
    reference: bool = True  # also time transformers' eager model on the same weights
    clock: str = "wall"  # "wall" (perf_counter) or "cpu" (process CPU time: robust on a busy machine)
    device: str = "cpu"  # torch device; on an accelerator every timed call waits for its queue


@dataclass
class Row:
    batch: int
    width: float
    depth: float
    median_ms: float
    p10_ms: float
    p90_ms: float
    params: int
    flops: int  # per sequence, at seq_len
    speedup: float  # our full model's median / this one's
    flop_ratio: float  # full FLOPs / these FLOPs
    efficiency: float  # speedup / flop_ratio


@dataclass
class Reference:
    batch: int
    name: str
    median_ms: float
    ours_full_ms: float
    ours_vs_reference: float  # reference median / our full median (>1: ours is faster)


# ---- models ------------------------------------------------------------------------------------


def build_models(shape: str | None, checkpoint: str | None, *, seed: int = 0) -> tuple[DynaBertModel, str]:
    """Our model and a human-readable description of where its weights came from."""
    if checkpoint:
        from model.checkpoint import load_checkpoint

        return load_checkpoint(checkpoint, load_tokenizer=False).model, f"checkpoint {checkpoint}"
    if shape == "minilm":
        from model.hf import backbone_dir, load_hf_model

        model = load_hf_model(backbone_dir("minilm-l6"), BENCH_TASK)
        return model.eval(), "all-MiniLM-L6-v2 (real weights)"
    if shape == "base":
        torch.manual_seed(seed)
        cfg = DynaBertConfig(
            architecture="bert", task=BENCH_TASK, dropout=0.0, attention_dropout=0.0, **BASE_SHAPE
        )
        return DynaBertModel(cfg).eval(), "BERT-base shape, random weights"
    raise ValueError(f"--shape must be 'base' or 'minilm' (or give --checkpoint), got {shape!r}")


def to_transformers(model: DynaBertModel) -> nn.Module | None:
    """transformers' eager BertModel / RobertaModel holding our weights (None for MPNet or an
    exported model with fewer heads, which transformers' BERT cannot express)."""
    import transformers

    cfg = model.cfg
    if cfg.architecture not in ("bert", "roberta") or cfg.attention_size != cfg.hidden_size:
        return None
    cls_cfg = transformers.BertConfig if cfg.architecture == "bert" else transformers.RobertaConfig
    hf_cfg = cls_cfg(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.ffn_size,
        max_position_embeddings=cfg.max_positions,
        type_vocab_size=max(cfg.type_vocab_size, 1),
        layer_norm_eps=cfg.layer_norm_eps,
        pad_token_id=cfg.pad_token_id,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    model_cls = transformers.BertModel if cfg.architecture == "bert" else transformers.RobertaModel
    hf = model_cls(hf_cfg)
    H, nh, hs = cfg.hidden_size, cfg.num_heads, cfg.head_size
    sd: dict[str, Tensor] = {}
    ours = model.state_dict()
    sd["embeddings.word_embeddings.weight"] = ours["embeddings.word_embeddings.weight"]
    sd["embeddings.position_embeddings.weight"] = ours["embeddings.position_embeddings.weight"]
    if cfg.type_vocab_size:
        sd["embeddings.token_type_embeddings.weight"] = ours["embeddings.token_type_embeddings.weight"]
    sd["embeddings.LayerNorm.weight"] = ours["embeddings.layer_norm.weight"]
    sd["embeddings.LayerNorm.bias"] = ours["embeddings.layer_norm.bias"]
    for i in range(cfg.num_layers):
        src, dst = f"layers.{i}.", f"encoder.layer.{i}."
        w = ours[src + "qkv_weight"].view(nh, 3, hs, H)
        b = ours[src + "qkv_bias"].view(nh, 3, hs)
        for j, name in enumerate(("query", "key", "value")):
            sd[dst + f"attention.self.{name}.weight"] = w[:, j].reshape(H, H)
            sd[dst + f"attention.self.{name}.bias"] = b[:, j].reshape(H)
        sd[dst + "attention.output.dense.weight"] = ours[src + "attn_out_weight_t"].t()
        sd[dst + "attention.output.dense.bias"] = ours[src + "attn_out_bias"]
        sd[dst + "attention.output.LayerNorm.weight"] = ours[src + "attn_norm.weight"]
        sd[dst + "attention.output.LayerNorm.bias"] = ours[src + "attn_norm.bias"]
        sd[dst + "intermediate.dense.weight"] = ours[src + "ffn_in_weight"]
        sd[dst + "intermediate.dense.bias"] = ours[src + "ffn_in_bias"]
        sd[dst + "output.dense.weight"] = ours[src + "ffn_out_weight_t"].t()
        sd[dst + "output.dense.bias"] = ours[src + "ffn_out_bias"]
        sd[dst + "output.LayerNorm.weight"] = ours[src + "ffn_norm.weight"]
        sd[dst + "output.LayerNorm.bias"] = ours[src + "ffn_norm.bias"]
    if "pooler.weight" in ours:
        sd["pooler.dense.weight"], sd["pooler.dense.bias"] = ours["pooler.weight"], ours["pooler.bias"]
    sd = {k: v.contiguous().clone() for k, v in sd.items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not m.startswith("pooler.") and "position_ids" not in m]
    if missing or unexpected:
        raise RuntimeError(
            f"weight mapping to transformers failed: missing {missing}, unexpected {unexpected}"
        )
    return hf.eval()


def make_inputs(cfg: DynaBertConfig, batch: int, seq_len: int, seed: int) -> dict[str, Tensor]:
    """Random token ids (no padding: every sequence is seq_len long), an all-ones mask, segment ids."""
    if seq_len > cfg.max_positions - cfg.position_offset:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's {cfg.max_positions - cfg.position_offset}")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(cfg.pad_token_id + 1, cfg.vocab_size, (batch, seq_len), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if cfg.type_vocab_size > 1:
        out["token_type_ids"] = (torch.arange(seq_len) >= seq_len // 2).long().expand(batch, -1).contiguous()
    return out


# ---- timing ------------------------------------------------------------------------------------


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def time_interleaved(
    candidates: dict[str, Callable[[], Any]], *, repeats: int, warmup: int, seed: int = 0, clock: str = "wall"
) -> dict[str, list[float]]:
    """Seconds per call for each candidate: warm-up, then `repeats` rounds in shuffled order.
    clock "cpu" counts this process's CPU time, which other processes barely disturb; it equals
    latency only with one thread (with more it adds up the threads' time, spin-waits included)."""
    now = CLOCKS[clock]
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in candidates}
    order = list(candidates)
    rng = random.Random(seed)
    for _ in range(repeats):
        rng.shuffle(order)
        for k in order:
            t0 = now()
            candidates[k]()
            times[k].append(now() - t0)
    return times


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


def _synced(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """``fn`` followed by a wait for ``device``'s queue, so a timed call covers its kernels and not
    only their launch; ``fn`` itself on the CPU."""
    if device.type != "cuda":
        return fn

    def call() -> Any:
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return call


def run_latency(model: DynaBertModel, opts: LatencyOptions) -> dict[str, Any]:
    """Time the grid (and the transformers reference) and return the JSON-ready report."""
    torch.set_num_threads(opts.threads)
    cfg = model.cfg
    device = torch.device(opts.device)
    if opts.clock == "cpu" and device.type != "cpu":
        raise ValueError("--clock cpu times this process's CPU, not an accelerator: use the wall clock")
    model.eval().to(device)
    hf = to_transformers(model) if opts.reference else None
    if hf is not None:
        hf.to(device)
    rows: list[Row] = []
    refs: list[Reference] = []
    check: dict[str, float] = {}
    grid = cfg.subnetworks()
    if (1.0, 1.0) not in grid:
        grid = [(1.0, 1.0), *grid]
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    for batch in opts.batch_sizes:
        inputs = {
            k: v.to(device) for k, v in make_inputs(cfg, batch, opts.seq_len, opts.seed + batch).items()
        }
        ids, mask, tt = inputs["input_ids"], inputs["attention_mask"], inputs.get("token_type_ids")

        cands: dict[str, Callable[[], Any]] = {
            f"{w}/{d}": _synced(partial(model, ids, mask, tt, width=w, depth=d), device) for w, d in grid
        }
        if hf is not None:
            cands["reference"] = _synced(partial(hf, **inputs), device)
            with torch.inference_mode():  # same weights, same function: say how close
                a = model(ids, mask, tt, output_hidden_states=True).hidden_states[-1]
                b = hf(**inputs).last_hidden_state
            check[str(batch)] = float((a - b).abs().max())
        with torch.inference_mode():
            times = time_interleaved(
                cands, repeats=opts.repeats, warmup=opts.warmup, seed=opts.seed, clock=opts.clock
            )
        full_ms = statistics.median(times["1.0/1.0"]) * 1e3
        for w, d in grid:
            ts = times[f"{w}/{d}"]
            med = statistics.median(ts) * 1e3
            speedup = full_ms / med
            flop_ratio = cfg.flops(1.0, 1.0, opts.seq_len) / cfg.flops(w, d, opts.seq_len)
            rows.append(
                Row(
                    batch=batch,
                    width=w,
                    depth=d,
                    median_ms=round(med, 3),
                    p10_ms=round(_pct(ts, 0.1) * 1e3, 3),
                    p90_ms=round(_pct(ts, 0.9) * 1e3, 3),
                    params=cfg.params(w, d),
                    flops=cfg.flops(w, d, opts.seq_len),
                    speedup=round(speedup, 3),
                    flop_ratio=round(flop_ratio, 3),
                    efficiency=round(speedup / flop_ratio, 3),
                )
            )
        if hf is not None:
            ref_ms = statistics.median(times["reference"]) * 1e3
            refs.append(
                Reference(
                    batch=batch,
                    name=f"transformers {type(hf).__name__} (eager)",
                    median_ms=round(ref_ms, 3),
                    ours_full_ms=round(full_ms, 3),
                    ours_vs_reference=round(ref_ms / full_ms, 3),
                )
            )
    return {
        "format_version": 1,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "threads": opts.threads,
            "device": str(device),
            "gpu": gpu_name(device),
            "torch": torch.__version__,
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "wall_s": round(time.perf_counter() - t_start, 1),
        },
        "options": {**asdict(opts), "batch_sizes": list(opts.batch_sizes)},
        "config": {
            "architecture": cfg.architecture,
            "hidden_size": cfg.hidden_size,
            "num_layers": cfg.num_layers,
            "num_heads": cfg.num_heads,
            "ffn_size": cfg.ffn_size,
        },
        "rows": [asdict(r) for r in rows],
        "reference": [asdict(r) for r in refs],
        "max_abs_diff_vs_reference": check,
    }


# ---- output ------------------------------------------------------------------------------------


def format_table(report: dict[str, Any], *, markdown: bool = False) -> str:
    """The report as text (aligned columns) or a Markdown table ready for docs/RESULTS.md."""
    head = [
        "batch",
        "width",
        "depth",
        "median ms",
        "p10-p90 ms",
        "params (M)",
        "GFLOPs/seq",
        "speedup",
        "FLOP ratio",
        "speedup/FLOP ratio",
    ]
    body = [
        [
            str(r["batch"]),
            f"{r['width']:g}",
            f"{r['depth']:g}",
            f"{r['median_ms']:.2f}",
            f"{r['p10_ms']:.1f}-{r['p90_ms']:.1f}",
            f"{r['params'] / 1e6:.2f}",
            f"{r['flops'] / 1e9:.2f}",
            f"{r['speedup']:.2f}x",
            f"{r['flop_ratio']:.2f}x",
            f"{r['efficiency']:.2f}",
        ]
        for r in report["rows"]
    ]
    ref_head = ["batch", "reference", "reference ms", "ours (1.0, 1.0) ms", "reference / ours"]
    ref_body = [
        [
            str(r["batch"]),
            r["name"],
            f"{r['median_ms']:.2f}",
            f"{r['ours_full_ms']:.2f}",
            f"{r['ours_vs_reference']:.2f}x",
        ]
        for r in report["reference"]
    ]
    out = [_table(head, body, markdown)]
    if ref_body:
        out.append(_table(ref_head, ref_body, markdown))
    m = report["machine"]
    o = report["options"]
    out.append(
        f"seq_len {o['seq_len']}, "
        + (f"{m['gpu']} ({m['device']}), " if m.get("gpu") else "")
        + f"{m['threads']} threads, {o['clock']} clock, {o['repeats']} interleaved rounds (medians), "
        f"torch {m['torch']}, {m['cpus']} CPUs, load average {m['loadavg_before'][0]} -> {m['loadavg_after'][0]}, "
        f"wall {m['wall_s']} s; max |ours - reference| on last hidden state: "
        + (", ".join(f"batch {b}: {v:.1e}" for b, v in report["max_abs_diff_vs_reference"].items()) or "n/a")
    )
    return "\n\n".join(out)


def _table(head: list[str], body: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*head)] + [fmt.format(*r) for r in body])


# ---- CLI -------------------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    if args.threads < 1 or args.repeats < 1 or args.warmup < 0 or args.seq_len < 1:
        raise ValueError(
            f"--threads/--repeats must be >= 1 and --warmup >= 0, got {args.threads}/{args.repeats}/{args.warmup}"
        )
    if any(b < 1 for b in args.batch_sizes):
        raise ValueError(f"--batch-sizes must be positive, got {args.batch_sizes}")
    shape = args.shape or (None if args.checkpoint else "minilm")
    model, source = build_models(shape, args.checkpoint, seed=args.seed)
    opts = LatencyOptions(
        threads=args.threads,
        seq_len=args.seq_len,
        batch_sizes=tuple(args.batch_sizes),
        repeats=args.repeats,
        warmup=args.warmup,
        seed=args.seed,
        reference=not args.no_reference,
        clock=args.clock,
        device=args.device,
    )
    log.info(
        "timing %s: %d sub-networks x batch %s, %d rounds",
        source,
        len(model.cfg.subnetworks()),
        opts.batch_sizes,
        opts.repeats,
    )
    report = run_latency(model, opts)
    report["source"] = source
    print(f"# dynabert bench latency: {source}")
    print(format_table(report, markdown=args.markdown))
    if args.json:
        write_report(args.json, report)
    return 0


def write_report(path: str | Path, report: dict[str, Any]) -> None:
    """A benchmark's report as indented JSON (its folder made), and a line saying where."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


def register_latency(bench_subparsers: argparse._SubParsersAction) -> None:
    p = bench_subparsers.add_parser(
        "latency",
        help="latency of every sub-network vs the full model and transformers (CPU, or --device)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="a DynaBERT checkpoint folder")
    src.add_argument(
        "--shape",
        choices=("base", "minilm"),
        help="BERT-base shape (random weights) or the real MiniLM weights (the default)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="default: 1 8")
    p.add_argument("--repeats", type=int, default=10, help="interleaved timed rounds (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per candidate (default 2)")
    p.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default="wall",
        help="wall: latency (default); cpu: process CPU time, for ratios on a busy machine (use --threads 1)",
    )
    p.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-reference", action="store_true", help="skip transformers' model")
    p.add_argument("--json", help="write the full report as JSON here")
    p.add_argument("--markdown", action="store_true", help="print Markdown tables (for docs/RESULTS.md)")
    p.set_defaults(func=_run)
