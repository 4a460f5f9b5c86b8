"""`dynabert train`, `dynabert eval` and `dynabert report`."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger("dynabert.training")


def register(subparsers: argparse._SubParsersAction) -> None:
    from training.data import TASK_NAMES
    from training.recipes import RECIPES, REUSABLE_STAGES

    p = subparsers.add_parser(
        "train", help="train a DynaBERT checkpoint (teacher, rewiring, two-stage distillation)"
    )
    p.add_argument("--task", required=True, choices=TASK_NAMES)
    p.add_argument("--backbone", default="minilm-l6", help="minilm-l6, mpnet-base, or a Hugging Face folder")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="data root (default: $DYNABERT_DATA_DIR or ../shared/data)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="token cache (default: $DYNABERT_CACHE_DIR or ~/.cache/dynabert)",
    )
    p.add_argument("--out", type=Path, required=True, help="output checkpoint folder")
    p.add_argument("--recipe", default="quick", choices=sorted(RECIPES))
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="change one recipe field, e.g. --set depth_stage.epochs=1 --set final_stage=none "
        "(repeatable; the run's recipe name records the changes)",
    )
    p.add_argument("--teacher", type=Path, default=None, help="a fine-tuned checkpoint: skips stage 0")
    p.add_argument("--resume", action="store_true", help="continue after the last finished stage in --out")
    p.add_argument(
        "--from-run",
        type=Path,
        default=None,
        help="start from another run's finished stages (copied into --out), up to --upto; "
        "e.g. stage 3 with --set changes from the very same DynaBERT_w",
    )
    p.add_argument(
        "--upto",
        default="dynabert_w",
        choices=REUSABLE_STAGES,
        help="the last stage --from-run takes (default dynabert_w)",
    )
    p.add_argument(
        "--ablation", choices=("separate", "vanilla"), default=None, help="train a baseline instead"
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--pooling",
        choices=("auto", "cls", "mean"),
        default="auto",
        help="what the classification head reads: the first token or the mean of the tokens "
        "(auto: as the backbone was trained, mean for sentence-transformers folders such as minilm-l6)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: the cores not already busy, at least 1: "
        "idle intra-op threads spin, so extra threads on a loaded CPU slow training down)",
    )
    p.set_defaults(func=cmd_train)

    e = subparsers.add_parser("eval", help="evaluate the sub-networks of a checkpoint; writes eval.json")
    e.add_argument("checkpoint", type=Path)
    e.add_argument("--split", default="dev")
    e.add_argument("--subnetworks", default="all", help="'all' or WIDTH:DEPTH,... e.g. 1.0:1.0,0.25:0.5")
    e.add_argument("--data-dir", type=Path, default=None)
    e.add_argument("--cache-dir", type=Path, default=None)
    e.add_argument("--limit", type=int, default=None, help="evaluate on the first N examples only")
    e.add_argument("--latency-repeats", type=int, default=20)
    e.add_argument("--no-write", action="store_true", help="print only, leave eval.json untouched")
    e.set_defaults(func=cmd_eval)

    r = subparsers.add_parser("report", help="regenerate report.md and pareto.png of a training run")
    r.add_argument("run", type=Path)
    r.set_defaults(func=cmd_report)


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from training.data import default_cache_dir, default_data_dir
    from training.pipeline import RunConfig, run_training
    from training.recipes import apply_overrides, get_recipe

    torch.set_num_threads(args.threads or _free_cores(torch.get_num_threads()))
    log.info("torch threads: %d", torch.get_num_threads())
    cfg = RunConfig(
        task=args.task,
        out=args.out,
        recipe=apply_overrides(get_recipe(args.recipe), args.overrides),
        backbone=args.backbone,
        data_dir=args.data_dir or default_data_dir(),
        cache_dir=args.cache_dir or default_cache_dir(),
        seed=args.seed,
        teacher=args.teacher,
        resume=args.resume,
        ablation=args.ablation,
        pooling=args.pooling,
        from_run=args.from_run,
        upto=args.upto,
    )
    results = run_training(cfg)
    print(
        f"{args.out}: average {results['metric']} over sub-networks = {results['average']:.4f} "
        f"(teacher {results['teacher']['value']:.4f}), {results['seconds']:.0f} s"
    )
    return 0


def _free_cores(default: int) -> int:
    """Cores not already busy (1-minute load average), between 1 and torch's default."""
    import os

    try:
        busy = os.getloadavg()[0]
    except OSError:  # not available on this platform
        return default
    return max(1, min(default, int((os.cpu_count() or 1) - busy + 0.5)))


def cmd_eval(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from model.checkpoint import load_checkpoint, write_eval
    from training.data import default_cache_dir, default_data_dir
    from training.evaluate import evaluate_subnetworks, parse_subnetworks
    from training.recipes import TINY
    from training.tasks import load_task_data

    if args.split != "dev":
        raise ValueError(f"--split {args.split!r}: only 'dev' has labels in GLUE/SQuAD downloads")
    ckpt = load_checkpoint(args.checkpoint)
    if ckpt.tokenizer is None:
        raise ValueError(f"{args.checkpoint}: no tokenizer files to encode the data with")
    cfg = ckpt.config
    subs = parse_subnetworks(args.subnetworks, cfg.subnetworks())
    sizing = replace(
        TINY,
        max_length=ckpt.max_seq_length,
        max_length_qa=ckpt.max_seq_length,
        doc_stride=min(128, ckpt.max_seq_length // 3),
        dev_examples=args.limit,
    )
    data = load_task_data(
        cfg.task.name,
        ckpt.tokenizer,
        args.data_dir or default_data_dir(),
        sizing,
        cache_dir=args.cache_dir or default_cache_dir(),
        train=False,
    )
    results = evaluate_subnetworks(
        ckpt.model, data, subs, latency_repeats=args.latency_repeats, split=args.split
    )
    for r in results:
        print(
            f"width {r['width']:<5} depth {r['depth']:<5} {r['metric']} {r['value']:.4f}  "
            f"params {r['params'] / 1e6:.1f}M  GFLOPs {r['flops'] / 1e9:.2f}  CPU {r['latency_ms_cpu']} ms"
        )
    if not args.no_write:
        if args.subnetworks.strip() != "all" and ckpt.eval:
            merged = {(e["width"], e["depth"]): e for e in ckpt.eval}
            merged.update({(r["width"], r["depth"]): r for r in results})
            results = [merged[k] for k in sorted(merged, reverse=True)]
        write_eval(args.checkpoint, results)
        print(f"wrote {Path(args.checkpoint) / 'eval.json'}")
    else:
        print(json.dumps(results))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from training.report import write_report

    print(write_report(args.run))
    return 0
