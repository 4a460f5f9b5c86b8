"""Live load readings for the policy: CPU utilisation (psutil) and GPU utilisation (NVML through
``nvidia-ml-py`` when importable, else ``torch.cuda.utilization``, else 0), sampled in a
background thread so that a request never waits for a measurement.

The CPU reading the policy wants is the load *other* processes put on the cores, so it is the
machine's utilisation minus this process's own share: our own inference must not make the
policy think the machine is contended.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

log = logging.getLogger(__name__)


def cpu_quota_cores(
    root: Path = Path("/sys/fs/cgroup"), cgroups: Path = Path("/proc/self/cgroup")
) -> float | None:
    """The CPU time this process may use, in cores, from its cgroup's CFS quota: the lowest of its
    own cgroup's and its parents' (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` over
    ``cpu.cfs_period_us``); None when no quota is set or none can be read. A container started
    with ``docker run --cpus 2`` or a Kubernetes CPU limit of 2 sees every core of its host, and
    torch starts a thread for each: far more runnable threads than the quota lets run, which the
    kernel then throttles for the rest of each period."""
    try:
        lines = cgroups.read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # cgroup v2: one tree
            dirs, files = [root], ("cpu.max",)
        elif "cpu" in controllers.split(","):  # cgroup v1: the cpu controller's tree
            dirs = list(
                dict.fromkeys([root / controllers, root / "cpu", root / "cpu,cpuacct"])
            )  # (mounts vary)
            files = ("cpu.cfs_quota_us", "cpu.cfs_period_us")
        else:
            continue
        rel = Path(path.lstrip("/"))
        for base in dirs:
            for here in [base / rel, *(base / p for p in rel.parents)]:  # own cgroup, then up to the root
                limit = _quota(here, files)
                if limit is not None:
                    limits.append(limit)
    return min(limits) if limits else None


def _quota(folder: Path, files: tuple[str, ...]) -> float | None:
    try:
        if len(files) == 1:  # v2: "QUOTA PERIOD" or "max PERIOD"
            quota, period = (folder / files[0]).read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota = int((folder / files[0]).read_text())
        period = int((folder / files[1]).read_text())
        return None if quota <= 0 or period <= 0 else quota / period  # v1: -1 is no quota
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """The cores this process can keep busy: those it may run on (its CPU affinity, a cpuset)
    and no more than its cgroup's CPU quota, rounded up (a quota of 1.5 cores can use two
    threads for part of each period)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # (not Linux)
        cores = os.cpu_count() or 1
    quota = cpu_quota_cores()
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


@dataclass(frozen=True)
class LoadReading:
    cpu: float = 0.0  # whole machine, 0..1
    cpu_other: float = 0.0  # other processes' share of all cores, 0..1
    gpu: float = 0.0  # 0..1, 0 without a GPU
    gpu_other: float = 0.0  # GPU utilisation not explained by our own inference, 0..1
    cpu_front: float = 0.0  # this server process's own share of all cores, its inference workers
    # excluded: the event loop's HTTP, tokenising and JSON work, which the workers' threads share
    # the cores with (0 when the forward pass runs in this process: the two cannot be told apart)


class _Gpu:
    """GPU utilisation reader: NVML, else torch.cuda, else nothing."""

    def __init__(self, device: str) -> None:
        self.read = lambda: 0.0
        self.source = "none"  # where readings come from: "nvml", "torch.cuda" or "none"
        if not device.startswith("cuda"):
            return
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        try:
            import pynvml  # nvidia-ml-py

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.read = lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0
            self.source = "nvml"
            return
        except Exception as e:  # not installed, or no NVML driver library
            log.info("NVML unavailable (%s); GPU utilisation from torch.cuda", e)
        try:
            import torch

            torch.cuda.utilization(index)
            self.read = lambda: torch.cuda.utilization(index) / 100.0
            self.source = "torch.cuda"
        except Exception as e:
            log.info("GPU utilisation unavailable (%s); reporting 0", e)


class LoadMonitor:
    """Samples CPU/GPU utilisation every ``interval_s`` seconds in a daemon thread."""

    def __init__(self, interval_s: float = 0.25, device: str = "cpu") -> None:
        self.interval_s = interval_s
        self._gpu = _Gpu(device)
        if device.startswith("cuda"):
            log.info("GPU utilisation of %s read through %s", device, self._gpu.source)
        self._proc = psutil.Process()
        self._helpers: list[psutil.Process] = []  # our inference worker processes
        self._ncpu = psutil.cpu_count() or 1
        self._reading = LoadReading()
        self._busy_s = 0.0  # seconds of inference run by this process since the last sample
        self._polling_s = 0.0  # seconds the event loop busy-polled for a batch's answer, likewise
        self._busy_lock = threading.Lock()
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def reading(self) -> LoadReading:
        return self._reading

    @property
    def gpu_source(self) -> str:
        """Where GPU readings come from: "nvml", "torch.cuda", or "none" (a CPU device, or neither)."""
        return self._gpu.source

    def add_process(self, pid: int | None) -> None:
        """Count ``pid`` (an inference worker) as this server's own CPU use, not another tenant's."""
        if pid is not None:
            p = psutil.Process(pid)
            p.cpu_percent(interval=None)  # prime its counter
            self._helpers.append(p)

    def _own_cpu(self) -> tuple[float, float]:
        """(this process + its inference workers, this process alone), shares of all cores."""
        front = self._proc.cpu_percent(interval=None)
        total = front
        for p in list(self._helpers):
            try:
                total += p.cpu_percent(interval=None)
            except psutil.Error:  # exited (a restarted worker is added again)
                self._helpers.remove(p)
        return total / 100.0 / self._ncpu, front / 100.0 / self._ncpu if self._helpers else 0.0

    def add_polling(self, seconds: float) -> None:
        """Reported after a batch the event loop busy-polled for (service/worker.py's
        ``busy_poll``): CPU time that is not front-end work, left out of ``cpu_front``, or the
        thread count would shrink to leave room for a loop that only polls when a core is free."""
        with self._busy_lock:
            self._polling_s += seconds

    def add_busy(self, seconds: float) -> None:
        """Reported by the scheduler after each batch: time this process kept the device busy."""
        with self._busy_lock:
            self._busy_s += seconds

    def sample(self) -> LoadReading:
        """One measurement since the previous call (the first call primes the counters)."""
        cpu = psutil.cpu_percent(interval=None) / 100.0
        own, front = self._own_cpu()
        try:
            gpu = float(self._gpu.read())
        except Exception:  # a GPU that went away must not stop the sampler
            gpu = 0.0
        now = time.monotonic()
        with self._busy_lock:
            busy, self._busy_s = self._busy_s, 0.0
            polling, self._polling_s = self._polling_s, 0.0
        busy_frac = min(1.0, busy / max(now - self._last, 1e-6))
        front -= polling / max(now - self._last, 1e-6) / self._ncpu
        self._last = now
        self._reading = LoadReading(
            cpu=cpu,
            cpu_other=min(1.0, max(0.0, cpu - own)),
            gpu=gpu,
            gpu_other=min(1.0, max(0.0, gpu - busy_frac)),
            cpu_front=min(1.0, max(0.0, front)),
        )
        return self._reading

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> None:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="dynabert-load", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval_s + 1)


def threads_for(reading: LoadReading, base: int, ncpu: int) -> int:
    """Intra-op threads to use now: at most ``base``, and no more than the cores that other
    processes and this server's own front end (the event loop, when the forward pass runs in a
    worker process) leave free, rounded. An OpenMP fork/join waits for its slowest thread, so on
    cores shared with another busy process two threads are slower than one (measured here:
    docs/RESULTS.md and docs/API.md); on an idle machine this is ``base``."""
    busy = min(max(reading.cpu_other, 0.0) + max(reading.cpu_front, 0.0), 1.0)
    free = ncpu * (1.0 - busy)
    return max(1, min(base, int(free + 0.5)))
