"""Hogs for the serving benchmark's second scenario: separate processes that keep a resource busy
that the server shares but does not control (issue 4, "a CPU hog ... halfway through").

- ``CpuHog``: one process per core (by default), each spinning in a pure-Python loop.
- ``GpuHog``: one process running large matrix products back to back on a GPU (bf16 on CUDA), so
  the server's kernels wait for another context's on the same chip, as under a co-located
  training job. Without MPS a GPU time-slices between processes, so every forward pass of the
  server queues behind the hog's work.

Every hog process stops by itself after ``max_seconds`` even if its parent dies, so a crashed
benchmark never leaves busy processes behind. ``python -m bench.hog --seconds 5`` spins one
core for 5 s; ``python -m bench.hog --device cuda --seconds 5`` keeps the first GPU busy.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time

log = logging.getLogger(__name__)


def spin(seconds: float) -> int:
    """Busy-loop on one core for ``seconds`` (wall clock); returns the number of iterations."""
    if seconds < 0:
        raise ValueError(f"seconds must be >= 0, got {seconds!r}")
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return n


def matmuls(seconds: float, device: str, size: int) -> int:
    """Square matrix products of side ``size`` back to back on ``device`` for ``seconds``; returns
    how many ran. bf16 on a GPU (its tensor cores: the densest load a co-tenant puts on the chip),
    float32 elsewhere. Each product is waited for, so the hog's queue stays one product deep and it
    stops within one product of its deadline."""
    import torch

    if seconds < 0:
        raise ValueError(f"seconds must be >= 0, got {seconds!r}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size!r}")
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=dev, dtype=dtype)
    b = torch.randn(size, size, device=dev, dtype=dtype)
    end = time.monotonic() + seconds
    n = 0
    with torch.inference_mode():
        while time.monotonic() < end:
            torch.mm(a, b)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            n += 1
    return n


class _Hog:
    """``processes`` busy child processes between ``start()`` and ``stop()``; a context manager.
    Each child also exits on its own after ``max_seconds``."""

    kind = "?"

    def __init__(self, processes: int, max_seconds: float, args: list[str]) -> None:
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes!r}")
        if max_seconds <= 0:
            raise ValueError(f"max_seconds must be > 0, got {max_seconds!r}")
        self.processes = processes
        self.max_seconds = float(max_seconds)
        self._args = args
        self._procs: list[subprocess.Popen] = []
        self.started_at: float | None = None

    @property
    def running(self) -> bool:
        return any(p.poll() is None for p in self._procs)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def start(self) -> _Hog:
        if self._procs:
            raise RuntimeError(f"hog already started (pids {self.pids})")
        cmd = [sys.executable, "-m", "bench.hog", "--seconds", f"{self.max_seconds:g}", *self._args]
        self._procs = [
            subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            for _ in range(self.processes)
        ]
        self.started_at = time.monotonic()
        log.info("%s hog started: %d processes (pids %s)", self.kind, self.processes, self.pids)
        return self

    def stop(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                p.terminate()
        for p in self._procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        if self._procs:
            log.info("%s hog stopped (pids %s)", self.kind, self.pids)
        self._procs = []

    def __enter__(self) -> _Hog:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class CpuHog(_Hog):
    """``processes`` spinning child processes (default: one per core)."""

    kind = "CPU"

    def __init__(self, processes: int | None = None, max_seconds: float = 600.0) -> None:
        super().__init__((os.cpu_count() or 1) if processes is None else processes, max_seconds, [])


class GpuHog(_Hog):
    """One child process (by default) multiplying ``size`` x ``size`` matrices back to back on
    ``device``; the child imports torch, so it is busy a second or two after ``start()``."""

    kind = "GPU"

    def __init__(
        self, device: str = "cuda", size: int = 8192, processes: int = 1, max_seconds: float = 600.0
    ) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size!r}")
        self.device, self.size = device, size
        super().__init__(processes, max_seconds, ["--device", device, "--size", str(size)])


def hog_kind(kind: str | None, device: str) -> str:
    """The hog for servers on ``device``: ``kind`` checked, or by default ``gpu`` on a CUDA
    device and ``cpu`` elsewhere."""
    on_gpu = device.startswith("cuda")
    kind = kind or ("gpu" if on_gpu else "cpu")
    if kind not in ("cpu", "gpu"):
        raise ValueError(f"hog kind must be 'cpu' or 'gpu', got {kind!r}")
    if kind == "gpu" and not on_gpu:
        raise ValueError(f"a GPU hog needs a CUDA device to share, the server runs on {device!r}")
    return kind


def hog_for(kind: str, device: str, max_seconds: float) -> _Hog:
    """The benchmark's hog: ``cpu`` (every core) or ``gpu`` (the served device's GPU)."""
    if hog_kind(kind, device) == "cpu":
        return CpuHog(max_seconds=max_seconds)
    return GpuHog(device=device, max_seconds=max_seconds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.hog", description="Keep one CPU core (or, with --device, a device) busy."
    )
    p.add_argument("--seconds", type=float, default=60.0, help="stop after this many seconds")
    p.add_argument(
        "--device", default=None, help="multiply matrices on this torch device instead of spinning"
    )
    p.add_argument("--size", type=int, default=8192, help="matrix side with --device (default 8192)")
    args = p.parse_args(argv)
    if args.device:
        matmuls(args.seconds, args.device, args.size)
    else:
        spin(args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
