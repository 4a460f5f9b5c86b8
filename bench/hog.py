"""A CPU hog for the serving benchmark's second scenario: separate processes, one per core,
each spinning in a pure-Python loop, so the server has to share its cores with something it does
not control (issue 4, "a CPU hog ... halfway through").

Every hog process stops by itself after ``max_seconds`` even if its parent dies, so a crashed
benchmark never leaves spinning processes behind. ``python -m bench.hog --seconds 5`` spins one
process for 5 s.
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


class CpuHog:
    """``processes`` spinning child processes (default: one per core) between ``start()`` and
    ``stop()``; usable as a context manager. Each child also exits on its own after ``max_seconds``."""

    def __init__(self, processes: int | None = None, max_seconds: float = 600.0) -> None:
        n = (os.cpu_count() or 1) if processes is None else processes
        if n < 1:
            raise ValueError(f"processes must be >= 1, got {processes!r}")
        if max_seconds <= 0:
            raise ValueError(f"max_seconds must be > 0, got {max_seconds!r}")
        self.processes = n
        self.max_seconds = float(max_seconds)
        self._procs: list[subprocess.Popen] = []
        self.started_at: float | None = None

    @property
    def running(self) -> bool:
        return any(p.poll() is None for p in self._procs)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def start(self) -> CpuHog:
        if self._procs:
            raise RuntimeError(f"hog already started (pids {self.pids})")
        cmd = [sys.executable, "-m", "bench.hog", "--seconds", f"{self.max_seconds:g}"]
        self._procs = [
            subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            for _ in range(self.processes)
        ]
        self.started_at = time.monotonic()
        log.info("CPU hog started: %d processes (pids %s)", self.processes, self.pids)
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
            log.info("CPU hog stopped (pids %s)", self.pids)
        self._procs = []

    def __enter__(self) -> CpuHog:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hog", description="Spin one CPU core for a while.")
    p.add_argument("--seconds", type=float, default=60.0, help="stop after this many seconds")
    args = p.parse_args(argv)
    spin(args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
