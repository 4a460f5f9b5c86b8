"""`dynabert export`: ship one sub-network as a small standalone checkpoint (and optionally ONNX).

Inside the full model a sub-network (width, depth) is a set of leading-row views of the shared
weights (model/modeling.py). Exporting copies exactly those rows into a new, physically smaller
model: num_heads, ffn_size and num_layers shrink, the head size stays (``head_dim``), and the
trained grid becomes the single point (1.0, 1.0). The result is an ordinary checkpoint folder:
``load_checkpoint`` reads it and the service can serve it.

ONNX: by default torch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``):
offline, needs only ``onnx``, about a second. ``--onnx-exporter dynamo`` uses the newer
torch.export-based exporter instead (needs ``onnxscript``, from the export/dev extras; slower).
Both give dynamic batch and sequence axes and match PyTorch to 1e-4 under ONNX Runtime.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import DynaBertConfig
from model.modeling import DynaBertModel

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
ONNX_OPSET = 17
ONNX_EXPORTERS = ("torchscript", "dynamo")


def sliced_config(cfg: DynaBertConfig, width: float, depth: float) -> DynaBertConfig:
    """The config of sub-network (width, depth) as a standalone full-size model."""
    return dataclasses.replace(
        cfg,
        num_heads=cfg.num_kept_heads(width),
        head_dim=cfg.head_size,
        ffn_size=cfg.num_kept_neurons(width),
        num_layers=len(cfg.kept_layers(depth)),
        widths=(1.0,),
        depths=(1.0,),
    )


@torch.no_grad()
def slice_model(model: DynaBertModel, width: float, depth: float) -> DynaBertModel:
    """A new model holding copies of only the weights sub-network (width, depth) uses."""
    cfg = model.cfg
    new_cfg = sliced_config(cfg, width, depth)
    k, n = new_cfg.num_heads, new_cfg.ffn_size
    a = k * cfg.head_size
    rows = {  # how many leading rows of each per-layer tensor the sub-network reads
        "qkv_weight": 3 * a,
        "qkv_bias": 3 * a,
        "attn_out_weight_t": a,
        "ffn_in_weight": n,
        "ffn_in_bias": n,
        "ffn_out_weight_t": n,
    }
    src = model.state_dict()
    sd: dict[str, Tensor] = {}
    for name, t in src.items():
        if not name.startswith("layers."):
            sd[name] = t.clone()
    for new_i, old_i in enumerate(cfg.kept_layers(depth)):
        prefix = f"layers.{old_i}."
        for name, t in src.items():
            if not name.startswith(prefix):
                continue
            short = name[len(prefix) :]
            if short in rows:
                t = t[: rows[short]]
            elif short == "rel_bias":  # (buckets, heads)
                t = t[:, :k]
            sd[f"layers.{new_i}.{short}"] = t.clone().contiguous()
    with torch.device("meta"):
        small = DynaBertModel(new_cfg)
    small.load_state_dict(sd, strict=True, assign=True)
    return small.eval()


def _carry_eval(
    entries: list[dict[str, Any]] | None, width: float, depth: float
) -> list[dict[str, Any]] | None:
    """The eval.json entry of the exported sub-network, relabelled as the new model's (1.0, 1.0)."""
    for e in entries or []:
        if abs(float(e["width"]) - width) < 1e-9 and abs(float(e["depth"]) - depth) < 1e-9:
            return [{**e, "width": 1.0, "depth": 1.0, "source_width": width, "source_depth": depth}]
    return None


class _OnnxWrapper(nn.Module):
    """Positional inputs, logits out: the graph ONNX sees."""

    def __init__(self, model: DynaBertModel, token_types: bool):
        super().__init__()
        self.model, self.token_types = model, token_types

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None
    ) -> Tensor:
        return self.model(input_ids, attention_mask, token_type_ids if self.token_types else None).logits


def onnx_input_names(cfg: DynaBertConfig) -> list[str]:
    """input_ids and attention_mask, plus token_type_ids when the architecture uses token types."""
    names = ["input_ids", "attention_mask"]
    return names + ["token_type_ids"] if cfg.type_vocab_size > 1 else names


def export_onnx(
    model: DynaBertModel, path: str | Path, *, seq_len: int = 16, exporter: str = "torchscript"
) -> Path:
    """Write ``model`` (run at its full size) as ONNX with dynamic batch and sequence axes."""
    if exporter not in ONNX_EXPORTERS:
        raise ValueError(f"ONNX exporter must be one of {ONNX_EXPORTERS}, got {exporter!r}")
    path = Path(path)
    cfg = model.cfg
    names = onnx_input_names(cfg)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(cfg.pad_token_id + 1, cfg.vocab_size, (2, seq_len), generator=g)
    mask = torch.ones_like(ids)
    mask[1, seq_len // 2 :] = 0  # a padded example, so the traced graph keeps the masking path
    args: tuple[Tensor, ...] = (ids, mask)
    if "token_type_ids" in names:
        args += (torch.zeros_like(ids),)
    dynamic = {n: {0: "batch", 1: "sequence"} for n in names}
    dynamic["logits"] = {0: "batch", 1: "sequence"} if cfg.task.type == "qa" else {0: "batch"}
    wrapper = _OnnxWrapper(model.eval(), "token_type_ids" in names).eval()
    if exporter == "dynamo":
        batch = torch.export.Dim("batch")
        seq = torch.export.Dim("sequence", max=cfg.max_positions - cfg.position_offset)
        with torch.no_grad():
            program = torch.onnx.export(
                wrapper,
                args,
                input_names=names,
                output_names=["logits"],
                dynamic_shapes={n: {0: batch, 1: seq} for n in names},
                opset_version=18,
                dynamo=True,
                verbose=False,
            )
        program.save(str(path))
        return path
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns that Python-level checks (sequence length, "is anything padded?") become
        # constants; the example above is padded, so the general masking path is the one recorded.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            wrapper,
            args,
            str(path),
            input_names=names,
            output_names=["logits"],
            dynamic_axes=dynamic,
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    return path


def export_subnetwork(
    checkpoint: str | Path,
    width: float,
    depth: float,
    out_dir: str | Path,
    *,
    onnx: bool = False,
    onnx_exporter: str = "torchscript",
) -> Path:
    """Write sub-network (width, depth) of ``checkpoint`` as a standalone checkpoint folder."""
    ck = load_checkpoint(checkpoint)
    cfg = ck.config
    cfg.num_kept_heads(width)  # validate before doing any work: ValueError names the value
    cfg.kept_layers(depth)
    small = slice_model(ck.model, width, depth)
    out = Path(out_dir)
    if out.resolve() == Path(checkpoint).resolve():
        raise ValueError(f"--out {out} would overwrite the source checkpoint")
    provenance = {
        **ck.meta.get("provenance", {}),
        "exported_from": str(Path(checkpoint).resolve()),
        "width": width,
        "depth": depth,
    }
    save_checkpoint(
        small,
        out,
        tokenizer=ck.tokenizer,
        max_seq_length=ck.max_seq_length,
        backbone=ck.meta.get("backbone", ""),
        provenance=provenance,
        eval_results=_carry_eval(ck.eval, width, depth),
    )
    if onnx:
        export_onnx(small, out / ONNX_FILE, exporter=onnx_exporter)
    return out


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def _run(args: argparse.Namespace) -> int:
    out = export_subnetwork(
        args.checkpoint, args.width, args.depth, args.out, onnx=args.onnx, onnx_exporter=args.onnx_exporter
    )
    src = Path(args.checkpoint) / "model.safetensors"
    dst = out / "model.safetensors"
    print(
        f"exported sub-network (width {args.width}, depth {args.depth}) to {out}: "
        f"model.safetensors {dst.stat().st_size / 1e6:.2f} MB (full: {src.stat().st_size / 1e6:.2f} MB)"
        + (f", {ONNX_FILE} {(out / ONNX_FILE).stat().st_size / 1e6:.2f} MB" if args.onnx else "")
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="write one sub-network as a small standalone checkpoint (optionally ONNX)",
        description="Slice sub-network (width, depth) out of a DynaBERT checkpoint into its own folder.",
    )
    p.add_argument("checkpoint", help="DynaBERT checkpoint folder")
    p.add_argument("--width", type=float, required=True, help="width multiplier in (0, 1], e.g. 0.5")
    p.add_argument("--depth", type=float, required=True, help="depth multiplier in (0, 1], e.g. 0.5")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--onnx", action="store_true", help=f"also write {ONNX_FILE} (dynamic batch/sequence)")
    p.add_argument(
        "--onnx-exporter",
        choices=ONNX_EXPORTERS,
        default="torchscript",
        help="torchscript (default: fast, needs only onnx) or dynamo (torch.export, needs onnxscript)",
    )
    p.set_defaults(func=_run)
