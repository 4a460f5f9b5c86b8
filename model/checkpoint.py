"""The DynaBERT checkpoint directory (DESIGN.md section 3, a contract):

    dynabert.json       format_version, config (architecture + width/depth lists + task),
                        max_seq_length, backbone, provenance
    model.safetensors   every weight, already rewired
    tokenizer files     as saved by transformers
    eval.json           optional: one entry per sub-network (written by training)

Loading is JSON + safetensors only (never a pickle) and validates every tensor's name and
shape against the config before building the model; every failure names the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.config import DynaBertConfig
from model.modeling import DynaBertModel

FORMAT_VERSION = 1
META_FILE, WEIGHTS_FILE, EVAL_FILE = "dynabert.json", "model.safetensors", "eval.json"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file and the problem."""


@dataclass
class Checkpoint:
    model: DynaBertModel
    tokenizer: Any  # a transformers fast tokenizer, or None when the folder has none
    meta: dict[str, Any]
    eval: list[dict[str, Any]] | None = None
    path: Path | None = None
    max_seq_length: int = 128
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> DynaBertConfig:
        return self.model.cfg


def expected_shapes(cfg: DynaBertConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape a checkpoint of this config must hold."""
    with torch.device("meta"):
        model = DynaBertModel(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def save_checkpoint(
    model: DynaBertModel,
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
    max_seq_length: int = 128,
    backbone: str = "",
    provenance: dict[str, Any] | None = None,
    eval_results: list[dict[str, Any]] | None = None,
) -> Path:
    """Write a checkpoint folder. Files are written to temporary names and renamed, so a crash
    never leaves a half-written model.safetensors behind a valid dynabert.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(sd, str(tmp), metadata={"format": "pt", "dynabert_format_version": str(FORMAT_VERSION)})
    tmp.chmod(_default_file_mode())  # safetensors creates 0600 files; a checkpoint is meant to be shared
    tmp.replace(out / WEIGHTS_FILE)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    meta = {
        "format_version": FORMAT_VERSION,
        "config": model.cfg.to_dict(),
        "max_seq_length": int(max_seq_length),
        "backbone": backbone,
        "provenance": provenance or {},
    }
    _write_json(out / META_FILE, meta)
    if eval_results is not None:
        write_eval(out, eval_results)
    return out


def _default_file_mode() -> int:
    """The mode an ordinary new file gets, 0o666 minus the umask (0o644 with umask 022). Read from
    /proc rather than by setting the umask, which would race with other threads creating files."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o644


def write_eval(out_dir: str | Path, results: list[dict[str, Any]]) -> Path:
    """eval.json: a list with one entry per sub-network (width, depth, params, flops, metrics...)."""
    return _write_json(Path(out_dir) / EVAL_FILE, {"format_version": FORMAT_VERSION, "subnetworks": results})


def _write_json(path: Path, obj: Any) -> Path:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    d = Path(path)
    f = d / META_FILE
    if not d.is_dir():
        raise CheckpointError(f"{d}: checkpoint folder does not exist")
    if not f.is_file():
        raise CheckpointError(f"{f}: missing (is {d} a DynaBERT checkpoint?)")
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from e
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{f}: unknown format_version {version!r} (this build reads {FORMAT_VERSION})")
    if "config" not in meta:
        raise CheckpointError(f"{f}: no 'config' entry")
    return meta


def read_eval(path: str | Path) -> list[dict[str, Any]] | None:
    f = Path(path) / EVAL_FILE
    if not f.is_file():
        return None
    try:
        data = json.loads(f.read_text())
        subs = data["subnetworks"]
        for s in subs:
            float(s["width"]), float(s["depth"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{f}: malformed eval file ({e!r})") from e
    return subs


def load_checkpoint(
    path: str | Path, *, device: str | torch.device = "cpu", load_tokenizer: bool = True
) -> Checkpoint:
    """Load and validate a checkpoint folder; the model is returned in eval mode."""
    d = Path(path)
    meta = read_meta(d)
    try:
        cfg = DynaBertConfig.from_dict(meta["config"])
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{d / META_FILE}: invalid config ({e})") from e

    wfile = d / WEIGHTS_FILE
    if not wfile.is_file():
        raise CheckpointError(f"{wfile}: missing")
    expected = expected_shapes(cfg)
    try:
        with safe_open(str(wfile), framework="pt", device="cpu") as f:
            names = set(f.keys())
            missing = sorted(set(expected) - names)
            unexpected = sorted(names - set(expected))
            if missing:
                raise CheckpointError(
                    f"{wfile}: missing tensor {missing[0]!r} ({len(missing)} missing in all)"
                )
            if unexpected:
                raise CheckpointError(
                    f"{wfile}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)"
                )
            for name, shape in expected.items():
                got = tuple(f.get_slice(name).get_shape())
                if got != shape:
                    raise CheckpointError(
                        f"{wfile}: tensor {name!r} has shape {list(got)}, config expects {list(shape)}"
                    )
            sd = {name: f.get_tensor(name) for name in expected}
    except SafetensorError as e:
        raise CheckpointError(f"{wfile}: unreadable safetensors file ({e})") from e
    except OSError as e:
        raise CheckpointError(f"{wfile}: cannot read ({e})") from e

    with torch.device("meta"):  # no throw-away random init: the loaded tensors become the parameters
        model = DynaBertModel(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    model.to(device).eval()

    tokenizer = None
    if load_tokenizer and (d / "tokenizer.json").is_file():
        from model.hf import load_tokenizer as _load_tok

        try:
            tokenizer = _load_tok(d)
        except (ValueError, OSError) as e:  # a corrupt file: say which, not only what the parser saw
            raise CheckpointError(f"{d}: tokenizer files unreadable ({type(e).__name__}: {e})") from e
    return Checkpoint(
        model=model,
        tokenizer=tokenizer,
        meta=meta,
        eval=read_eval(d),
        path=d,
        max_seq_length=int(meta.get("max_seq_length", 128)),
    )
