"""One `dynabert train` run: stages in order, each saved as a checkpoint under ``OUT/stages/`` so
``--resume`` continues after the last finished stage, then the final checkpoint in ``OUT`` with
eval.json, results.json, report.md and pareto.png.

Resuming restarts an interrupted stage from its beginning with a fresh optimizer: optimizer state
is never saved (it would double a checkpoint's size and cannot be pickled under our rules), and
stages are short enough that redoing one is cheap.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from model.hf import backbone_dir, load_hf_model, load_tokenizer
from model.modeling import DynaBertModel
from training import stages as S
from training.data import task_spec
from training.evaluate import average, evaluate_subnetworks
from training.recipes import REUSABLE_STAGES, Recipe
from training.tasks import load_task_data

log = logging.getLogger(__name__)

STATE_FILE, RESULTS_FILE = "train_state.json", "results.json"
ABLATIONS = ("separate", "vanilla")


@dataclass(frozen=True)
class RunConfig:
    """The options of one training run (everything `dynabert train` takes)."""

    task: str
    out: Path
    recipe: Recipe
    backbone: str = "minilm-l6"
    data_dir: Path | None = None
    cache_dir: Path | None = None
    seed: int = 42
    teacher: Path | None = None
    resume: bool = False
    ablation: str | None = None
    pooling: str = "auto"  # the classification head's pooling: auto (the backbone's own), cls, mean
    from_run: Path | None = None  # start from this run's stages, up to and including `upto`
    upto: str = "dynabert_w"


def seed_from_run(src: Path, out: Path, upto: str, task: str) -> list[str]:
    """Copy ``src``'s finished stages up to and including ``upto`` into a fresh ``out``, so that a
    resumed run trains only what comes after them (e.g. stage 3 with another recipe, from the
    very same DynaBERT_w: a controlled ablation). Returns the stages copied."""
    if upto not in REUSABLE_STAGES:
        raise ValueError(f"--upto {upto!r}: expected one of {', '.join(REUSABLE_STAGES)}")
    state_file = Path(src) / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"--from-run {src}: no {STATE_FILE} (not a training run folder)")
    state = json.loads(state_file.read_text())
    if state.get("task") != task or state.get("ablation"):
        raise ValueError(
            f"--from-run {src}: a run of task {state.get('task')!r} (ablation {state.get('ablation')!r}), "
            f"not a DynaBERT run of {task!r}"
        )
    if (Path(out) / STATE_FILE).is_file():
        raise FileExistsError(f"--from-run: {out} already holds a run; choose a new --out")
    keep = list(REUSABLE_STAGES[: REUSABLE_STAGES.index(upto) + 1])
    missing = [k for k in keep if k not in state["stages"] or not (Path(src) / "stages" / k).is_dir()]
    if missing:
        raise ValueError(f"--from-run {src}: stage(s) {', '.join(missing)} not finished there")
    for k in keep:
        shutil.copytree(Path(src) / "stages" / k, Path(out) / "stages" / k)
    state["stages"] = {k: state["stages"][k] for k in keep}
    state["from_run"] = {"dir": str(src), "stages": keep}
    (Path(out) / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    return keep


class Run:
    """State of a run on disk: which stages are done and what they measured."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.state_file = self.out / STATE_FILE
        self.is_main = True  # only rank 0 writes the state file under torchrun
        self.state: dict[str, Any] = {"stages": {}}
        if cfg.resume and self.state_file.is_file():
            self.state = json.loads(self.state_file.read_text())
            if self.state.get("task") != cfg.task or self.state.get("ablation") != cfg.ablation:
                raise ValueError(
                    f"{self.state_file}: was a run of task {self.state.get('task')!r} "
                    f"(ablation {self.state.get('ablation')!r}); cannot resume it as {cfg.task!r} ({cfg.ablation!r})"
                )
            log.info("resuming %s: done %s", self.out, list(self.state["stages"]))
        elif self.state_file.is_file():
            log.warning("%s exists: starting over (pass --resume to continue it)", self.state_file)
        self.state.update(task=cfg.task, ablation=cfg.ablation, recipe=cfg.recipe.name, seed=cfg.seed)

    def done(self, stage: str) -> bool:
        return stage in self.state["stages"] and (
            not self.state["stages"][stage].get("checkpoint")
            or (self.stage_dir(stage) / "dynabert.json").is_file()
        )

    def stage_dir(self, stage: str) -> Path:
        return self.out / "stages" / stage

    def record(self, stage: str, info: dict[str, Any]) -> None:
        self.state["stages"][stage] = info
        if not self.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2) + "\n")
        tmp.replace(self.state_file)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _trainable(model: DynaBertModel, recipe: Recipe) -> DynaBertModel:
    model.requires_grad_(True)
    if recipe.freeze_word_embeddings:
        model.embeddings.word_embeddings.weight.requires_grad_(False)
    return model


def _load_stage(run: Run, stage: str, device: torch.device) -> DynaBertModel:
    return load_checkpoint(run.stage_dir(stage), device=device, load_tokenizer=False).model


def _checkpointed_stage(
    ctx: S.Context,
    run: Run,
    stage: str,
    source: DynaBertModel,
    train: Callable[[DynaBertModel], Any],
    save,
    evaluate,
    subs: list[tuple[float, float]] | None = None,
) -> DynaBertModel:
    """A stage whose result is kept as a checkpoint: resumed from it when already done, else a
    trainable copy of ``source`` is trained by ``train(model) -> logs``, saved, and its dev
    metrics (on ``subs``, all sub-networks when None) recorded."""
    if run.done(stage):
        return _load_stage(run, stage, ctx.device)
    model = _trainable(S.frozen(source), ctx.recipe)
    logs = train(model)
    save(model, run.stage_dir(stage))
    run.record(stage, {"checkpoint": True, "train": logs, "eval": evaluate(model, subs)})
    return model


def run_training(cfg: RunConfig) -> dict[str, Any]:
    """Run (or resume) every stage; returns the results written to OUT/results.json."""
    if cfg.ablation not in (None, *ABLATIONS):
        raise ValueError(f"unknown ablation {cfg.ablation!r}; expected one of {ABLATIONS}")
    t_start, cpu_start = time.perf_counter(), _cpu_seconds()
    if cfg.from_run is not None:
        if cfg.ablation or cfg.teacher:
            raise ValueError(
                "--from-run starts a DynaBERT run from another's stages: no --ablation or --teacher"
            )
        kept = seed_from_run(cfg.from_run, cfg.out, cfg.upto, cfg.task)
        log.info("starting from %s: %s", cfg.from_run, ", ".join(kept))
        cfg = replace(cfg, resume=True)
    _seed_everything(cfg.seed)
    rank, world, device = S.distributed_context()
    recipe = cfg.recipe
    run = Run(cfg)
    run.is_main = rank == 0
    spec = task_spec(cfg.task)

    teacher_ckpt = (
        load_checkpoint(cfg.teacher, device=device) if cfg.teacher and not run.done("teacher") else None
    )
    if run.done("teacher"):  # resuming: the tokenizer was saved with the teacher
        tokenizer = load_tokenizer(run.stage_dir("teacher"))
        backbone = run.state.get("backbone", cfg.backbone)
    elif teacher_ckpt is not None:
        if teacher_ckpt.config.task.name != cfg.task:
            raise ValueError(
                f"--teacher {cfg.teacher} was trained on {teacher_ckpt.config.task.name!r}, not {cfg.task!r}"
            )
        tokenizer = teacher_ckpt.tokenizer
        if tokenizer is None:
            raise ValueError(f"--teacher {cfg.teacher}: the checkpoint has no tokenizer files")
        backbone = teacher_ckpt.meta.get("backbone", str(cfg.teacher))
    else:
        bdir = backbone_dir(cfg.backbone)
        tokenizer = load_tokenizer(bdir)
        backbone = cfg.backbone
    run.state["backbone"] = backbone
    data_dir = cfg.data_dir
    if data_dir is None:
        from training.data import default_data_dir

        data_dir = default_data_dir()
    data = load_task_data(cfg.task, tokenizer, data_dir, recipe, seed=cfg.seed, cache_dir=cfg.cache_dir)
    ctx = S.Context(recipe=recipe, data=data, device=device, seed=cfg.seed, rank=rank, world=world)
    max_len = recipe.max_length_qa if spec.type == "qa" else recipe.max_length

    def save(model: DynaBertModel, folder: Path, **kw: Any) -> None:
        if ctx.is_main:
            save_checkpoint(
                model, folder, tokenizer=tokenizer, max_seq_length=max_len, backbone=backbone, **kw
            )
        _barrier(world)

    def evaluate(model: DynaBertModel, subs: list[tuple[float, float]] | None = None) -> list[dict[str, Any]]:
        return evaluate_subnetworks(
            model,
            data,
            subs,
            batch_size=recipe.eval_batch_size,
            device=device,
            latency_repeats=recipe.latency_repeats,
        )

    # ---- stage 0: the teacher ----
    if run.done("teacher"):
        teacher = _load_stage(run, "teacher", device)
    elif teacher_ckpt is not None:
        teacher = teacher_ckpt.model
        save(teacher, run.stage_dir("teacher"))
        run.record(
            "teacher",
            {"checkpoint": True, "from": str(cfg.teacher), "eval": evaluate(teacher, [(1.0, 1.0)])[0]},
        )
    else:
        teacher = _trainable(
            load_hf_model(backbone_dir(cfg.backbone), spec, pooling=cfg.pooling).to(device), recipe
        )
        logs = S.train_teacher(ctx, teacher)
        save(teacher, run.stage_dir("teacher"))
        run.record("teacher", {"checkpoint": True, "train": logs, "eval": evaluate(teacher, [(1.0, 1.0)])[0]})
    log.info("teacher %s = %.4f", spec.metric, run.state["stages"]["teacher"]["eval"]["value"])

    if cfg.ablation == "vanilla":
        result_model = _vanilla(ctx, run, teacher, save, evaluate)
    else:
        # ---- stage 1: importance and rewiring ----
        if run.done("rewired"):
            rewired = _load_stage(run, "rewired", device)
        else:
            rewired = S.frozen(teacher)  # a copy; rewiring permutes it in place
            rewired.requires_grad_(True)
            info = S.rewire(ctx, rewired)
            save(rewired, run.stage_dir("rewired"))
            run.record("rewired", {"checkpoint": True, **info})
        if cfg.ablation == "separate":
            _separate(ctx, run, rewired, evaluate)
            result_model = None
        else:
            if recipe.augment:  # distillation stages only: their targets come from the teacher
                _augment(ctx, cfg, data_dir, tokenizer, backbone)
            result_model = _dynabert(ctx, run, rewired, save, evaluate)

    results = {
        "kind": cfg.ablation or "dynabert",
        "task": cfg.task,
        "metric": spec.metric,
        "backbone": backbone,
        "recipe": recipe.name,
        "seed": cfg.seed,
        "train_examples": data.num_train,
        "dev_examples": data.num_dev,
        "teacher": run.state["stages"]["teacher"]["eval"],
        "stages": {
            k: {kk: vv for kk, vv in v.items() if kk not in ("head_importance",)}
            for k, v in run.state["stages"].items()
        },
        "seconds": round(time.perf_counter() - t_start, 1),
        "cpu_seconds": round(_cpu_seconds() - cpu_start, 1),  # for honest timings on a shared machine
        "threads": torch.get_num_threads(),
    }
    st = run.state["stages"]
    if cfg.ablation == "separate":
        results["separate"] = [st[f"separate_w{w}"]["eval"] for w in teacher.cfg.widths]
    elif cfg.ablation == "vanilla":
        results["width_only"] = st["vanilla_w"]["eval"]
        results["subnetworks"] = st["vanilla"]["eval"]
    else:
        results["width_only"] = st["dynabert_w"]["eval"]
        results["subnetworks"] = st["final"]["eval"]
        results["stage4"] = st["final"]["choice"]
    results["average"] = average(results.get("subnetworks") or results.get("separate", []))

    if ctx.is_main:
        provenance = {
            "recipe": recipe.to_dict(),
            "data": {
                "task": cfg.task,
                "dir": str(data_dir),
                "train_examples": data.num_train,
                "dev_examples": data.num_dev,
            },
            "seed": cfg.seed,
            "teacher": str(cfg.teacher) if cfg.teacher else None,
            "ablation": cfg.ablation,
            "stage4": results.get("stage4"),
            "teacher_eval": results["teacher"],
        }
        if result_model is not None:
            save_checkpoint(
                result_model,
                run.out,
                tokenizer=tokenizer,
                max_seq_length=max_len,
                backbone=backbone,
                provenance=provenance,
                eval_results=results["subnetworks"],
            )
        (run.out / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
        from training.report import write_report

        write_report(run.out)
        parent = run.out.parent
        if parent.name == "baselines" and (parent.parent / RESULTS_FILE).is_file():
            write_report(parent.parent)  # a baseline run refreshes the main run's report
    _barrier(world)
    log.info("done in %.1fs: %s", results["seconds"], run.out)
    return results


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process so far."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _augment(ctx: S.Context, cfg: RunConfig, data_dir: Path, tokenizer: Any, backbone: str) -> None:
    """TinyBERT-style augmentation (training/augment.py) of the GLUE training texts for the
    distillation stages; candidates from the backbone's MLM head, else its embedding neighbours."""
    from training.augment import AugmentConfig, Augmenter, candidate_source
    from training.data import Example, load_split
    from training.tasks import GlueData

    if not isinstance(ctx.data, GlueData):
        log.warning("augmentation is implemented for GLUE tasks only; %s trains without it", cfg.task)
        return
    t0 = time.perf_counter()
    try:
        folder = backbone_dir(backbone)
    except (FileNotFoundError, ImportError) as e:
        log.warning("augmentation skipped: cannot find the backbone %r (%s)", backbone, e)
        return
    augmenter = Augmenter(
        candidate_source(folder), AugmentConfig(n_samples=ctx.recipe.augment_samples, seed=cfg.seed)
    )
    examples = load_split(data_dir, cfg.task, "train", limit=ctx.recipe.train_examples, seed=cfg.seed)
    variants = augmenter.augment_pairs([e.texts for e in examples])
    extra = [Example(tuple(v), e.label) for e, vs in zip(examples, variants, strict=True) for v in vs]
    max_len = ctx.recipe.max_length
    ctx.data.add_train_texts(extra, tokenizer, max_len)
    log.info("augmentation: %d new examples in %.1fs", len(extra), time.perf_counter() - t0)


def _dynabert(ctx: S.Context, run: Run, rewired: DynaBertModel, save, evaluate) -> DynaBertModel:
    """Stages 2-4."""
    device, recipe = ctx.device, ctx.recipe
    widths_full_depth = [(w, 1.0) for w in rewired.cfg.widths]
    # ---- stage 2: DynaBERT_w ----
    width_model = _checkpointed_stage(
        ctx,
        run,
        "dynabert_w",
        rewired,
        lambda m: S.train_width(ctx, S.frozen(rewired), m),
        save,
        evaluate,
        widths_full_depth,
    )
    # ---- stage 3: DynaBERT ----
    depth_model = _checkpointed_stage(
        ctx,
        run,
        "dynabert",
        width_model,
        lambda m: S.train_depth(ctx, S.frozen(width_model), m),
        save,
        evaluate,
    )
    # ---- stage 4: optional fine-tuning on the labels; keep the better average ----
    if run.done("final"):
        choice = run.state["stages"]["final"]["choice"]
        return depth_model if choice != "after" else _load_stage(run, "final", device)
    before = run.state["stages"]["dynabert"]["eval"]
    if recipe.final_stage is None:
        run.record("final", {"checkpoint": False, "choice": "skipped", "eval": before})
        return depth_model
    tuned = _trainable(S.frozen(depth_model), recipe)
    logs = S.train_on_labels(
        replace(ctx, data=ctx.data.originals()),  # fine-tuning on labels: no augmented texts
        tuned,
        recipe.final_stage,
        tuned.cfg.subnetworks(),
        recipe.subnets_per_step,
        "stage 4 fine-tune",
        rule=recipe.subnet_sampling,
    )
    after = evaluate(tuned)
    keep_after = average(after) > average(before)
    log.info(
        "stage 4: average %.4f before, %.4f after: keeping %s",
        average(before),
        average(after),
        "after" if keep_after else "before",
    )
    if keep_after:
        save(tuned, run.stage_dir("final"))
    run.record(
        "final",
        {
            "checkpoint": keep_after,
            "choice": "after" if keep_after else "before",
            "train": logs,
            "average_before": average(before),
            "average_after": average(after),
            "eval": after if keep_after else before,
        },
    )
    return tuned if keep_after else depth_model


def _separate(ctx: S.Context, run: Run, rewired: DynaBertModel, evaluate) -> None:
    """Baseline: the rewired teacher sliced to each width, each fine-tuned alone on the labels at
    full depth for the DynaBERT_w stage's budget. Only the metrics are kept (not 4 sets of weights)."""
    for w in rewired.cfg.widths:
        stage = f"separate_w{w}"
        if run.done(stage):
            continue
        model = _trainable(S.frozen(rewired), ctx.recipe)
        logs = S.train_on_labels(ctx, model, ctx.recipe.width_stage, [(w, 1.0)], None, f"separate w={w}")
        run.record(stage, {"checkpoint": False, "train": logs, "eval": evaluate(model, [(w, 1.0)])[0]})


def _vanilla(ctx: S.Context, run: Run, teacher: DynaBertModel, save, evaluate) -> DynaBertModel:
    """Baseline: no rewiring, no distillation: the fine-tuned teacher trained on the labels at every
    width (full depth), then at every width and depth, with the same budgets as stages 2 and 3."""
    recipe = ctx.recipe
    widths = [(w, 1.0) for w in teacher.cfg.widths]
    model = _checkpointed_stage(
        ctx,
        run,
        "vanilla_w",
        teacher,
        lambda m: S.train_on_labels(
            ctx, m, recipe.width_stage, widths, recipe.widths_per_step, "vanilla widths"
        ),
        save,
        evaluate,
        widths,
    )
    return _checkpointed_stage(
        ctx,
        run,
        "vanilla",
        model,
        lambda m: S.train_on_labels(
            ctx,
            m,
            recipe.depth_stage,
            m.cfg.subnetworks(),
            recipe.subnets_per_step,
            "vanilla widths x depths",
            rule=recipe.subnet_sampling,  # the same sampling (and cost) as stage 3
        ),
        save,
        evaluate,
    )
