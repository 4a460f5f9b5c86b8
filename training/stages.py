"""The training stages of DynaBERT (Hou et al., NeurIPS 2020, Algorithm 1) and the baselines,
on top of one generic loop (:func:`train_loop`, in the spirit of minGPT's trainer: the stage
supplies a ``step`` hook that computes and back-propagates its losses).

0. teacher: fine-tune the backbone on the labels;
1. rewire: Taylor importance of heads and neurons on dev, then sort them (training/importance.py);
2. DynaBERT_w: distil the rewired teacher into every width at full depth, gradients accumulated;
3. DynaBERT: distil DynaBERT_w (at the student's width, or full width) into every width x depth;
4. optional fine-tuning on the labels, kept only if the average dev metric improves.

Teachers are frozen (``requires_grad_(False)``) and run under ``torch.no_grad()``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from model.modeling import DynaBertModel, DynaBertOutput
from training.importance import rewire_by_importance
from training.losses import DistillLoss, label_loss
from training.recipes import DEPTH_TEACHERS, SUBNET_SAMPLING, Recipe, StageSchedule
from training.tasks import Batch, TaskData, to_device

log = logging.getLogger(__name__)

# A stage's step returns its numbers to log as tensors (detached, on the device): reading them back
# (`.item()`) would make the host wait for the GPU after every sub-network; train_loop sums them
# on the device and reads them once per log line instead.
StepFn = Callable[[Batch], dict[str, Tensor]]


@dataclass
class Context:
    """What every stage needs: the recipe, the data, the device and the distributed layout."""

    recipe: Recipe
    data: TaskData
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on a GPU when the recipe asks for mixed precision; a no-op on the CPU."""
        if self.device.type == "cuda" and self.recipe.mixed_precision:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def inputs(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor | None]:
        return batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]


def frozen(model: DynaBertModel) -> DynaBertModel:
    """A frozen copy to serve as a teacher: eval mode (no dropout), no gradients."""
    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    return teacher


def num_steps(schedule: StageSchedule, data: TaskData, batch_size: int, world: int = 1) -> int:
    if schedule.steps is not None:
        return max(1, schedule.steps)
    return max(1, math.ceil(schedule.epochs * data.num_train_batches(batch_size) / world))


def make_optimizer(model: DynaBertModel, recipe: Recipe, lr: float) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and LayerNorm weights (the BERT convention). The fused
    kernel where the parameters' device has one (CPU and CUDA): on a CPU PyTorch otherwise runs
    the per-tensor loop, ~10 small operators per tensor; for MiniLM-L6's 11M trainable
    parameters a step took 58 ms that way and 8 ms fused, 70 s of the quick recipe's 1400 steps."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": recipe.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)


def linear_schedule(
    optimizer: torch.optim.Optimizer, total: int, warmup: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the peak learning rate, then linear decay to 0."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _all_reduce_grads(model: DynaBertModel, world: int) -> None:
    """Average gradients over ranks (torchrun). Done by hand rather than with DDP's hooks because a
    step back-propagates several sub-networks that use different slices of the same weights."""
    if world == 1:
        return
    import torch.distributed as dist

    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= world


def _batches_forever(ctx: Context) -> Iterator[Batch]:
    epoch = 0
    while True:
        for batch in ctx.data.train_batches(ctx.recipe.batch_size, ctx.seed + epoch, (ctx.rank, ctx.world)):
            yield to_device(batch, ctx.device)
        epoch += 1


def train_loop(
    ctx: Context, model: DynaBertModel, schedule: StageSchedule, step: StepFn, desc: str
) -> dict[str, float]:
    """Optimise ``model`` for the schedule's steps. ``step(batch)`` runs the forward passes,
    calls ``backward`` on its losses (gradients accumulate over sub-networks) and returns the
    numbers to log. Returns the mean of each logged number over the stage."""
    recipe = ctx.recipe
    total = num_steps(schedule, ctx.data, recipe.batch_size, ctx.world)
    optimizer = make_optimizer(model, recipe, schedule.lr)
    scheduler = linear_schedule(optimizer, total, int(schedule.warmup_ratio * total))
    params = [p for p in model.parameters() if p.requires_grad]
    sums: dict[str, Tensor] = {}
    window: dict[str, Tensor] = {}
    log_every = max(1, total // 10)
    model.train()
    t0, cpu0 = time.perf_counter(), time.process_time()
    batches = _batches_forever(ctx)
    bar = tqdm(range(total), desc=desc, disable=not ctx.is_main or None, dynamic_ncols=True, leave=False)
    for i in bar:
        optimizer.zero_grad(set_to_none=True)
        logs = step(next(batches))
        _all_reduce_grads(model, ctx.world)
        logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm).detach()
        optimizer.step()
        scheduler.step()
        for k, v in logs.items():
            sums[k] = sums[k] + v if k in sums else v
            window[k] = window[k] + v if k in window else v
        if (i + 1) % log_every == 0 or i + 1 == total:
            n = log_every if (i + 1) % log_every == 0 else (i + 1) % log_every
            means = dict(zip(window, (v / n for v in _read(window.values())), strict=True))
            bar.set_postfix(loss=f"{means.get('loss', 0.0):.4f}")
            log.info(
                "%s step %d/%d lr=%.2e %s (%.1fs)",
                desc,
                i + 1,
                total,
                scheduler.get_last_lr()[0],
                " ".join(f"{k}={v:.4f}" for k, v in means.items()),
                time.perf_counter() - t0,
            )
            window = {}
    bar.close()
    model.eval()
    out = {k: round(v / total, 6) for k, v in zip(sums, _read(sums.values()), strict=True)}
    out["steps"], out["seconds"] = total, round(time.perf_counter() - t0, 2)
    out["cpu_seconds"] = round(time.process_time() - cpu0, 2)
    return out


def _read(values: Iterable[Tensor]) -> list[float]:
    """Device tensors to floats with one transfer (one wait for the GPU)."""
    values = list(values)
    if not values:
        return []
    return torch.stack([v.float().reshape(()) for v in values]).tolist()


# ---- sub-network sampling --------------------------------------------------------------------


def _accumulate(logs: dict[str, Tensor], **values: Tensor) -> None:
    """Add detached losses into a step's logs without leaving the device."""
    for k, v in values.items():
        v = v.detach().float()
        logs[k] = logs[k] + v if k in logs else v


def _with_labels(ctx: Context, loss: Tensor, out: Any, batch: Batch, logs: dict[str, Tensor]) -> Tensor:
    """``loss`` + l0 * the label loss when the recipe's ``label_weight`` (l0) is set, over the
    batch's original texts only: an augmented text keeps the label of the text it was made from,
    which a replaced word can make wrong ("good" -> "bad", "love" -> "hate" are near neighbours),
    so it learns from the teacher's logits alone, as in TinyBERT."""
    l0 = ctx.recipe.label_weight
    if not l0:
        return loss
    logits, targets = out.logits.float(), batch["labels"]
    augmented = batch.get("augmented")
    if augmented is not None:
        if bool(augmented.all()):
            return loss
        logits, targets = logits[~augmented], targets[~augmented]
    labels = label_loss(logits, targets, ctx.data.spec.type)
    _accumulate(logs, label=labels)
    return loss + l0 * labels


def _flops(model: DynaBertModel) -> Callable[[tuple[float, float]], float]:
    """A sub-network's cost for the ``cost`` sampling rule: its FLOPs."""
    return lambda sub: float(model.cfg.flops(*sub))


def sample_subnetworks(
    grid: list[tuple[float, float]],
    k: int | None,
    rng: random.Random,
    *,
    rule: str = "sandwich",
    cost: Callable[[tuple[float, float]], float] | None = None,
) -> list[tuple[float, float]]:
    """All of ``grid`` (largest first), or k of them by ``rule``:

    * ``sandwich``: the largest, the smallest and k - 2 others at random (the sandwich rule of
      universally slimmable networks, Yu & Huang, ICCV 2019);
    * ``uniform``: the smallest and k - 1 others at random, the largest among them;
    * ``cost``: the smallest and k - 1 others drawn with probability proportional to 1 / ``cost``
      (e.g. FLOPs): cheap sub-networks are trained more often, so a step costs less and more
      steps fit in the same time.
    """
    if k is None or k >= len(grid):
        return list(grid)
    if rule not in SUBNET_SAMPLING:
        raise ValueError(f"unknown sampling rule {rule!r}; expected one of {SUBNET_SAMPLING}")
    big, small = max(grid), min(grid)
    picked = ([big, small] if rule == "sandwich" else [small])[:k]
    rest = [s for s in grid if s not in picked]
    n = max(0, k - len(picked))
    if rule == "cost":
        if cost is None:
            raise ValueError("the cost rule needs a cost function")
        for _ in range(n):
            rest_w = [1.0 / cost(s) for s in rest]
            s = rng.choices(rest, weights=rest_w)[0]
            picked.append(s)
            rest.remove(s)
    else:
        picked += rng.sample(rest, n)
    return sorted(set(picked), reverse=True)


# ---- the stages ------------------------------------------------------------------------------


def train_teacher(
    ctx: Context, model: DynaBertModel, schedule: StageSchedule | None = None
) -> dict[str, float]:
    """Stage 0: fine-tune the full network on the labels (cross-entropy, or MSE for regression)."""
    task_type = model.cfg.task.type

    def step(batch: Batch) -> dict[str, float]:
        with ctx.autocast():
            out = model(*ctx.inputs(batch))
            loss = label_loss(out.logits.float(), batch["labels"], task_type)
        loss.backward()
        return {"loss": loss.detach()}

    return train_loop(ctx, model, schedule or ctx.recipe.teacher, step, "stage 0 teacher")


def rewire(ctx: Context, model: DynaBertModel) -> dict[str, Any]:
    """Stage 1: importance on the dev set, then rewiring (in place)."""
    t0 = time.perf_counter()
    batches = (
        to_device(b, ctx.device)
        for b in ctx.data.dev_batches(ctx.recipe.eval_batch_size, ctx.recipe.importance_examples)
    )
    heads, neurons = rewire_by_importance(model, batches, ctx.device)
    return {
        "seconds": round(time.perf_counter() - t0, 2),
        "head_importance": [[round(float(x), 6) for x in row] for row in heads],
    }


def train_width(ctx: Context, teacher: DynaBertModel, student: DynaBertModel) -> dict[str, float]:
    """Stage 2 (DynaBERT_w): the rewired teacher, fixed, distils into every width at full depth;
    loss l1 * SCE(logits) + l2 * (MSE(embeddings) + sum of MSE(hidden states))."""
    criterion = DistillLoss(student.cfg.task.type, *ctx.recipe.width_loss, ctx.recipe.temperature)
    widths = [(w, 1.0) for w in student.cfg.widths]
    rng = random.Random(ctx.seed + 2)

    def step(batch: Batch) -> dict[str, float]:
        inputs = ctx.inputs(batch)
        with torch.no_grad(), ctx.autocast():
            t_out = teacher(*inputs, output_hidden_states=True)
        logs: dict[str, Tensor] = {}
        for w, _ in sample_subnetworks(widths, ctx.recipe.widths_per_step, rng):
            with ctx.autocast():
                s_out = student(*inputs, width=w, output_hidden_states=True)
                loss, logit, hidden = criterion(s_out, t_out)
                loss = _with_labels(ctx, loss, s_out, batch, logs)
            loss.backward()  # gradients of every width accumulate (Algorithm 1, line 9)
            _accumulate(logs, loss=loss, logit=logit, hidden=hidden)
        return logs

    return train_loop(ctx, student, ctx.recipe.width_stage, step, "stage 2 DynaBERT_w")


class TeacherLogits:
    """The logits of a fixed teacher (eval mode, so deterministic) for each training example,
    computed the first time the example is drawn and read back on every later epoch. For a stage
    that distils the logits alone (l2 = 0) this replaces the teacher's forward pass from the second
    epoch on: in `quick`'s stage 3 (900 steps over 16,000 examples, 1.8 epochs) the full-width
    teacher's forward is a third of a step's work. Needs the batches' ``index`` (GLUE tasks);
    QA features are not cached (their logits span every token)."""

    def __init__(self, teacher: DynaBertModel, ctx: Context, num_examples: int):
        self.teacher, self.ctx = teacher, ctx
        self.num_examples = num_examples
        self.store: dict[float, tuple[Tensor, Tensor]] = {}  # width -> (logits (N, C), filled (N,))
        self.computed = self.reused = 0  # examples, for the log and the tests

    def __call__(self, inputs: tuple[Tensor, Tensor, Tensor | None], index: Tensor, width: float) -> Tensor:
        if width not in self.store:
            c = self.teacher.cfg.task.num_outputs
            dev = index.device
            self.store[width] = (
                torch.zeros(self.num_examples, c, device=dev),
                torch.zeros(self.num_examples, dtype=torch.bool, device=dev),
            )
        logits, filled = self.store[width]
        missing = (~filled[index]).nonzero().squeeze(1)
        if len(missing):
            rows = [x[missing] if x is not None else None for x in inputs]
            with torch.no_grad(), self.ctx.autocast():
                out = self.teacher(*rows, width=width).logits
            logits[index[missing]] = out.float()
            filled[index[missing]] = True
        self.computed += len(missing)
        self.reused += len(index) - len(missing)
        return logits[index]


def train_depth(
    ctx: Context, teacher: DynaBertModel, student: DynaBertModel, *, cache_logits: bool = True
) -> dict[str, float]:
    """Stage 3 (DynaBERT): DynaBERT_w, fixed, distils into every (width, depth); the teacher runs
    at the student's width (or full width) and full depth; kept layers are matched by the depth
    rule (``DynaBertOutput.teacher_layers``). When only the logits are distilled (l2 = 0), the
    teacher's logits are computed once per example (:class:`TeacherLogits`)."""
    criterion = DistillLoss(student.cfg.task.type, *ctx.recipe.depth_loss, ctx.recipe.temperature)
    grid = student.cfg.subnetworks()
    same_width = ctx.recipe.depth_teacher == "same_width"
    if ctx.recipe.depth_teacher not in DEPTH_TEACHERS:
        raise ValueError(f"depth_teacher must be one of {DEPTH_TEACHERS}, got {ctx.recipe.depth_teacher!r}")
    rng = random.Random(ctx.seed + 3)
    k, rule = ctx.recipe.subnets_per_step, ctx.recipe.subnet_sampling
    cost = _flops(student)
    cache = None
    num_train = getattr(ctx.data, "num_train", 0)
    if cache_logits and not criterion.l2 and student.cfg.task.type != "qa" and num_train:
        cache = TeacherLogits(teacher, ctx, num_train)

    def teacher_out(inputs: tuple[Tensor, Tensor, Tensor | None], batch: Batch, width: float) -> Any:
        if cache is not None and batch.get("index") is not None:
            return DynaBertOutput(cache(inputs, batch["index"], width))
        with torch.no_grad(), ctx.autocast():
            return teacher(*inputs, width=width, output_hidden_states=True)

    def step(batch: Batch) -> dict[str, float]:
        inputs = ctx.inputs(batch)
        t_outs: dict[float, Any] = {}
        logs: dict[str, Tensor] = {}
        for w, d in sample_subnetworks(grid, k, rng, rule=rule, cost=cost):
            tw = w if same_width else 1.0
            if tw not in t_outs:
                t_outs[tw] = teacher_out(inputs, batch, tw)
            with ctx.autocast():
                s_out = student(*inputs, width=w, depth=d, output_hidden_states=True)
                loss, logit, hidden = criterion(s_out, t_outs[tw])
                loss = _with_labels(ctx, loss, s_out, batch, logs)
            loss.backward()
            _accumulate(logs, loss=loss, logit=logit, hidden=hidden)
        return logs

    logs = train_loop(ctx, student, ctx.recipe.depth_stage, step, "stage 3 DynaBERT")
    if cache is not None and cache.computed:
        logs["teacher_logits_reused"] = round(cache.reused / (cache.reused + cache.computed), 4)
        log.info(
            "stage 3: teacher logits read back for %.0f%% of examples", 100 * logs["teacher_logits_reused"]
        )
    return logs


def train_on_labels(
    ctx: Context,
    model: DynaBertModel,
    schedule: StageSchedule,
    subnetworks: list[tuple[float, float]],
    per_step: int | None,
    desc: str,
    rule: str = "sandwich",
) -> dict[str, float]:
    """Supervised training of several sub-networks at once (stage 4, the vanilla baseline, and a
    separate network when ``subnetworks`` has one entry): label loss summed over sub-networks."""
    task_type = model.cfg.task.type
    rng = random.Random(ctx.seed + 4)
    cost = _flops(model)

    def step(batch: Batch) -> dict[str, float]:
        inputs = ctx.inputs(batch)
        logs: dict[str, Tensor] = {}
        for w, d in sample_subnetworks(subnetworks, per_step, rng, rule=rule, cost=cost):
            with ctx.autocast():
                loss = label_loss(model(*inputs, width=w, depth=d).logits.float(), batch["labels"], task_type)
            loss.backward()
            _accumulate(logs, loss=loss)
        return logs

    return train_loop(ctx, model, schedule, step, desc)


def distributed_context() -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; (0, 1, cuda or cpu) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend)
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return dist.get_rank(), world, device
    return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
