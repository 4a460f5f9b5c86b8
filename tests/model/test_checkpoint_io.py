"""Checkpoint folder round trip and every way loading must fail (naming the file and tensor)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import (
    EVAL_FILE,
    META_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    load_checkpoint,
    read_eval,
    save_checkpoint,
)
from model.config import DynaBertConfig, TaskSpec
from model.modeling import DynaBertModel

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def ckpt(tiny_cls_checkpoint: Path, tmp_path: Path) -> Path:
    """A private copy of the session's tiny checkpoint, free to corrupt."""
    return Path(shutil.copytree(tiny_cls_checkpoint, tmp_path / "ckpt"))


def test_round_trip_keeps_weights_config_and_outputs(tmp_path: Path) -> None:
    torch.manual_seed(3)
    task = TaskSpec(type="qa", name="squad", text_fields=("question", "context"), metric="f1")
    cfg = DynaBertConfig(
        architecture="roberta",
        vocab_size=120,
        hidden_size=32,
        num_layers=3,
        num_heads=4,
        ffn_size=40,
        max_positions=50,
        type_vocab_size=1,
        pad_token_id=1,
        widths=(1.0, 0.5),
        depths=(1.0, 0.67),
        task=task,
    )
    model = DynaBertModel(cfg).eval()
    results = [{"width": 1.0, "depth": 1.0, "metric": "f1", "value": 0.5}]
    out = save_checkpoint(
        model, tmp_path / "c", max_seq_length=48, backbone="x", provenance={"seed": 3}, eval_results=results
    )
    assert {p.name for p in out.iterdir()} == {META_FILE, WEIGHTS_FILE, EVAL_FILE}
    ck = load_checkpoint(out)
    assert ck.config == cfg
    assert ck.max_seq_length == 48 and ck.meta["backbone"] == "x" and ck.meta["provenance"] == {"seed": 3}
    assert ck.eval == results and ck.tokenizer is None and not ck.model.training
    for k, v in model.state_dict().items():
        assert torch.equal(ck.model.state_dict()[k], v), k
    ids = torch.randint(3, 120, (2, 9))
    for w, d in cfg.subnetworks():
        with torch.inference_mode():
            torch.testing.assert_close(
                ck.model(ids, width=w, depth=d).logits, model(ids, width=w, depth=d).logits
            )


def test_fixture_checkpoint_loads_with_tokenizer(tiny_cls_checkpoint: Path) -> None:
    ck = load_checkpoint(tiny_cls_checkpoint)
    assert ck.tokenizer is not None and len(ck.eval) == 12
    enc = ck.tokenizer(["hello world"], return_tensors="pt")
    assert ck.model(enc["input_ids"], enc["attention_mask"]).logits.shape == (1, 2)


def _expect(path: Path, *fragments: str) -> None:
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"


def test_missing_folder(tmp_path: Path) -> None:
    _expect(tmp_path / "nope", str(tmp_path / "nope"))


def test_missing_meta_file(ckpt: Path) -> None:
    (ckpt / META_FILE).unlink()
    _expect(ckpt, str(ckpt / META_FILE), "missing")


def test_missing_weights_file(ckpt: Path) -> None:
    (ckpt / WEIGHTS_FILE).unlink()
    _expect(ckpt, str(ckpt / WEIGHTS_FILE), "missing")


@pytest.mark.parametrize("keep", [0.5, 0.99, 0.0])
def test_truncated_weights_file(ckpt: Path, keep: float) -> None:
    f = ckpt / WEIGHTS_FILE
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])
    _expect(ckpt, str(f))


def test_garbage_weights_file(ckpt: Path) -> None:
    (ckpt / WEIGHTS_FILE).write_bytes(b"\x80\x04\x95not a safetensors file at all" * 10)
    _expect(ckpt, str(ckpt / WEIGHTS_FILE))


def _rewrite(ckpt: Path, edit) -> None:
    sd = load_file(str(ckpt / WEIGHTS_FILE))
    edit(sd)
    save_file(sd, str(ckpt / WEIGHTS_FILE))


def test_wrong_shape_names_file_and_tensor(ckpt: Path) -> None:
    _rewrite(ckpt, lambda sd: sd.__setitem__("layers.2.ffn_in_weight", torch.zeros(63, 32)))
    _expect(ckpt, str(ckpt / WEIGHTS_FILE), "'layers.2.ffn_in_weight'", "[63, 32]", "[64, 32]")


def test_missing_tensor_names_file_and_tensor(ckpt: Path) -> None:
    _rewrite(ckpt, lambda sd: sd.pop("layers.1.attn_norm.bias"))
    _expect(ckpt, str(ckpt / WEIGHTS_FILE), "missing", "'layers.1.attn_norm.bias'")


def test_unexpected_tensor_names_file_and_tensor(ckpt: Path) -> None:
    _rewrite(ckpt, lambda sd: sd.__setitem__("layers.9.surprise", torch.zeros(3)))
    _expect(ckpt, str(ckpt / WEIGHTS_FILE), "unexpected", "'layers.9.surprise'")


def _edit_meta(ckpt: Path, edit) -> None:
    meta = json.loads((ckpt / META_FILE).read_text())
    edit(meta)
    (ckpt / META_FILE).write_text(json.dumps(meta))


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_unknown_format_version(ckpt: Path, version) -> None:
    _edit_meta(ckpt, lambda m: m.__setitem__("format_version", version))
    _expect(ckpt, str(ckpt / META_FILE), "format_version", repr(version))


def test_meta_not_json(ckpt: Path) -> None:
    (ckpt / META_FILE).write_text("{not json")
    _expect(ckpt, str(ckpt / META_FILE), "JSON")


def test_config_mismatch_with_weights(ckpt: Path) -> None:
    _edit_meta(ckpt, lambda m: m["config"].__setitem__("num_layers", 5))
    _expect(ckpt, str(ckpt / WEIGHTS_FILE), "'layers.4.")


def test_unknown_config_field(ckpt: Path) -> None:
    _edit_meta(ckpt, lambda m: m["config"].__setitem__("flux_capacitor", 1))
    _expect(ckpt, str(ckpt / META_FILE), "flux_capacitor")


def test_malformed_eval_file(ckpt: Path) -> None:
    (ckpt / EVAL_FILE).write_text('{"format_version": 1, "subnetworks": [{"width": "wide"}]}')
    _expect(ckpt, str(ckpt / EVAL_FILE))
    (ckpt / EVAL_FILE).unlink()
    assert read_eval(ckpt) is None and load_checkpoint(ckpt).eval is None


def test_no_pickle_anywhere_in_the_source() -> None:
    """Checkpoints are JSON + safetensors only: no library code may unpickle (or pickle) anything."""
    pattern = re.compile(
        r"\btorch\.(load|save)\s*\(|\bimport\s+(c?pickle|dill|joblib)\b|\bpickle\.|\.from_pickle\b"
    )
    hits = []
    for folder in ("model", "training", "service", "bench"):
        for f in sorted((REPO / folder).rglob("*.py")):
            for no, line in enumerate(f.read_text().splitlines(), 1):
                if pattern.search(line):
                    hits.append(f"{f.relative_to(REPO)}:{no}: {line.strip()}")
    assert not hits, "pickle-based I/O found:\n" + "\n".join(hits)


def test_weights_file_is_readable_by_others(tmp_path: Path) -> None:
    """safetensors writes 0600 files; a checkpoint read by another user (a container's non-root
    user, a teammate) must get the ordinary umask mode like every other file in the folder."""
    import os

    mask = os.umask(0o022)
    try:
        task = TaskSpec(labels=("a", "b"))
        cfg = DynaBertConfig(
            vocab_size=50, hidden_size=8, num_layers=1, num_heads=2, ffn_size=8, max_positions=16, task=task
        )
        out = save_checkpoint(DynaBertModel(cfg), tmp_path / "c")
    finally:
        os.umask(mask)
    assert (out / WEIGHTS_FILE).stat().st_mode & 0o777 == 0o644
    assert (out / META_FILE).stat().st_mode & 0o777 == 0o644
