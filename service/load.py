"""Live load readings for the policy: CPU utilisation (psutil) and GPU utilisation (NVML through
``nvidia-ml-py`` when importable, else ``torch.cuda.utilization``, else 0), sampled in a
background thread so that a request never waits for a measurement.

The CPU reading the policy wants is the load *other* processes put on the cores this server runs
on, so it is those cores' utilisation minus this process's own share: our own inference must not
make the policy think the machine is contended. "The cores this server runs on" are its CPU
affinity (a cpuset: ``docker run --cpuset-cpus``, Kubernetes' static CPU manager), read per core
from ``/proc/stat``, and every share is of the cores it may *use* (:func:`cpu_capacity`: the
affinity capped by the cgroup's CPU quota, 1.5 for a quota of 1.5 cores). Under a quota without
a cpuset (``docker run --cpus 2``, a Kubernetes CPU limit) the affinity is the whole host: other
tenants' work there first fills the cores the quota leaves to them (:func:`other_share`), and
only what overflows them competes with ours. Read over the whole host, a node 60% busy would
slow every prediction 1.6x for a server its neighbours do not touch.
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


def _cpu_cgroups(root: Path, cgroups: Path) -> list[tuple[Path, tuple[str, ...]]]:
    """``(folder, its quota files)`` of this process's cgroup and each of its parents up to the
    root, in the CPU controller's tree of either cgroup version (v2: one tree, ``cpu.max``; v1:
    the ``cpu`` controller's, ``cpu.cfs_quota_us`` and ``cpu.cfs_period_us``), from ``cgroups``
    (``/proc/self/cgroup``); empty where that cannot be read."""
    try:
        lines = cgroups.read_text().splitlines()
    except OSError:
        return []
    out: list[tuple[Path, tuple[str, ...]]] = []
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
        for base in dirs:  # own cgroup, then up to the root
            out += [(here, files) for here in [base / rel, *(base / p for p in rel.parents)]]
    return out


def _binding_quota(root: Path, cgroups: Path) -> tuple[float, Path] | None:
    """``(quota in cores, its cgroup's folder)`` of the CFS quota that binds this process: the
    lowest of those set on its cgroup and its parents (the nearest of equal ones); None when none
    is set or can be read."""
    found = ((_quota(here, files), here) for here, files in _cpu_cgroups(root, cgroups))
    quotas = [(limit, here) for limit, here in found if limit is not None]
    return min(quotas, key=lambda q: q[0], default=None)


def cpu_quota_cores(
    root: Path = Path("/sys/fs/cgroup"), cgroups: Path = Path("/proc/self/cgroup")
) -> float | None:
    """The CPU time this process may use, in cores, from its cgroup's CFS quota: the lowest of its
    own cgroup's and its parents' (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` over
    ``cpu.cfs_period_us``); None when no quota is set or none can be read. A container started
    with ``docker run --cpus 2`` or a Kubernetes CPU limit of 2 sees every core of its host, and
    torch starts a thread for each: far more runnable threads than the quota lets run, which the
    kernel then throttles for the rest of each period."""
    binding = _binding_quota(root, cgroups)
    return None if binding is None else binding[0]


def cpu_stat_file(
    root: Path = Path("/sys/fs/cgroup"), cgroups: Path = Path("/proc/self/cgroup")
) -> Path | None:
    """The ``cpu.stat`` of the cgroup whose CFS quota binds this process (the lowest of its own
    and its parents'), which counts the quota's periods and those in which the kernel throttled the
    cgroup (:func:`throttle_counts`); None without a quota."""
    binding = _binding_quota(root, cgroups)
    if binding is None:
        return None
    stat = binding[1] / "cpu.stat"
    return stat if stat.is_file() else None


def throttle_counts(stat: Path | None) -> tuple[int, int] | None:
    """``(periods, throttled periods)`` since the cgroup was made, from its ``cpu.stat``
    (``nr_periods``, ``nr_throttled``: the same keys in both cgroup versions; a period counts
    when the cgroup had work to run in it); None where it cannot be read."""
    if stat is None:
        return None
    try:
        fields = dict(words[:2] for words in map(str.split, stat.read_text().splitlines()) if len(words) >= 2)
        return int(fields["nr_periods"]), int(fields["nr_throttled"])
    except (OSError, KeyError, ValueError):
        return None


def throttled_share(before: tuple[int, int] | None, now: tuple[int, int] | None) -> float:
    """The share of the CFS periods between two :func:`throttle_counts` in which the kernel
    throttled the cgroup (it had used its quota before the period ended), 0..1; 0 without a
    quota, or when no period with work to run passed."""
    if before is None or now is None or now[0] <= before[0]:
        return 0.0
    return min(1.0, max(0.0, (now[1] - before[1]) / (now[0] - before[0])))


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


def affinity() -> frozenset[int]:
    """The CPUs this process may run on (its cpuset); every CPU where that cannot be read."""
    try:
        return frozenset(os.sched_getaffinity(0))
    except AttributeError:  # (not Linux)
        return frozenset(range(os.cpu_count() or 1))


def cpu_capacity() -> float:
    """The CPU time this process may use, in cores: the CPUs it may run on (its affinity, a
    cpuset), capped by its cgroup's CPU quota, not rounded (1.5 under ``docker run --cpus 1.5``
    or a Kubernetes limit of 1500m). The load readings' shares and the policy's capacity are of
    this: the kernel lets the server's threads run 1.5 cores' worth of each period, however many
    there are, and throttles them for the rest."""
    cores = float(len(affinity()))
    quota = cpu_quota_cores()
    if quota is not None:
        cores = min(cores, quota)
    return max(cores, 0.01)


def usable_cores(capacity: float | None = None) -> int:
    """The threads that can keep busy: :func:`cpu_capacity` (or ``capacity``) rounded up, at
    least 1 (a quota of 1.5 cores can use two threads for part of each period)."""
    return max(1, math.ceil((cpu_capacity() if capacity is None else capacity) - 1e-9))


def cpu_ticks(cpus: frozenset[int], stat: Path = Path("/proc/stat")) -> dict[int, tuple[int, int]]:
    """``{cpu: (busy, total)}`` clock ticks since boot of each of ``cpus``, from ``/proc/stat``
    (psutil's per-CPU times where that cannot be read). Busy is all but idle and I/O wait, as
    psutil counts it; steal (a hypervisor running another guest) is busy: the time is lost to us."""
    out: dict[int, tuple[int, int]] = {}
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        for cpu, t in enumerate(psutil.cpu_times(percpu=True)):
            if cpu in cpus:
                idle = t.idle + getattr(t, "iowait", 0.0)
                total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
                out[cpu] = (round((total - idle) * 1000), round(total * 1000))
        return out
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or not name[3:].isdigit() or int(name[3:]) not in cpus:
            continue
        f = [int(x) for x in rest.split()]
        total = sum(f[:8])  # user nice system idle iowait irq softirq steal (guest is within user)
        out[int(name[3:])] = (total - f[3] - f[4], total)
    return out


def other_share(busy_cores: float, own_cores: float, cpus: int, usable: float) -> float:
    """Other processes' load on the cores this server may use, as a share of them (0..1).
    ``busy_cores`` is the busy time of the ``cpus`` it may run on (in cores), ``own_cores`` its
    own (server and inference workers). Where a CPU quota lets it use fewer cores (``usable``)
    than it may run on, the others' work first fills the ``cpus - usable`` cores the quota leaves
    free (the kernel wakes a task on an idle core), and only the rest competes with ours. On a
    host busy to its last core this reads the others' use, not their demand (a saturated core's
    waiting tasks do not show in its utilisation): the policy's observed/predicted feedback
    (``Policy.correction``) measures the slow-down that remains."""
    other = max(0.0, busy_cores - own_cores)
    return min(1.0, max(0.0, other - max(cpus - usable, 0.0)) / max(usable, 0.01))


@dataclass(frozen=True)
class LoadReading:
    cpu: float = 0.0  # utilisation of the CPUs this server may run on (its affinity), 0..1
    cpu_other: float = 0.0  # other processes' load on the cores it may use (other_share), 0..1
    gpu: float = 0.0  # 0..1, 0 without a GPU
    gpu_other: float = 0.0  # GPU utilisation not explained by our own inference, 0..1
    cpu_front: float = 0.0  # this server process's own share of the cores it may use, its
    # inference workers excluded: the event loop's HTTP, tokenising and JSON work, which the
    # workers' threads share the cores with (0 when the forward pass runs in this process: the
    # two cannot be told apart)
    cpu_throttled: float = 0.0  # share of its CPU quota's periods in which the kernel throttled
    # the server's cgroup (throttled_share), 0..1; 0 without a quota


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
    """Samples CPU/GPU utilisation every ``interval_s`` seconds in a daemon thread. CPU readings
    are of the ``cpus`` this process may run on (default: its affinity) and shares of the
    ``cores`` it may use (default: :func:`cpu_capacity`; 1.5 under a quota of 1.5 cores). Under a
    CPU quota, the share of its periods the kernel throttled the cgroup in is read from the
    ``cpu_stat`` file (default: :func:`cpu_stat_file`, the binding quota's cgroup).

    Inference work is registered per *owner* (a served model's name): its worker processes
    (:meth:`add_process`) and the seconds its batches kept the device busy (:meth:`add_busy`).
    :meth:`reading` of an owner counts the other owners' inference as contention, as it is for
    that model's forward passes: with an SST-2 classifier and a SQuAD model side by side on two
    cores, the QA model's busy workers slow the classifier's as another tenant would, and counted
    as "the server's own" they were invisible to its policy. :meth:`reading` without an owner is
    the server's view (all of its inference its own): the gauges', and any single model's."""

    def __init__(
        self,
        interval_s: float = 0.25,
        device: str = "cpu",
        cpus: frozenset[int] | None = None,
        cores: float | None = None,
        cpu_stat: Path | None = None,
    ) -> None:
        self.interval_s = interval_s
        self.cpus = cpus if cpus is not None else affinity()
        self.cores = cores if cores is not None else cpu_capacity()
        self._ticks = cpu_ticks(self.cpus)
        # the binding CPU quota's cgroup counts its throttled periods (read once: a process
        # does not change cgroup while it serves)
        self.cpu_stat = cpu_stat if cpu_stat is not None else cpu_stat_file()
        self._throttle = throttle_counts(self.cpu_stat)
        self._gpu = _Gpu(device)
        if device.startswith("cuda"):
            log.info("GPU utilisation of %s read through %s", device, self._gpu.source)
        self._proc = psutil.Process()
        self._helpers: dict[str, list[psutil.Process]] = {}  # owner -> its inference worker processes
        self._reading = LoadReading()
        self._readings: dict[str, LoadReading] = {}  # per owner; replaced, never mutated
        # owner -> seconds its inference kept the device busy since the last sample
        self._busy_s: dict[str, float] = {}
        self._polling_s = 0.0  # seconds the event loop busy-polled for a batch's answer, likewise
        self._busy_lock = threading.Lock()
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def reading(self, owner: str | None = None) -> LoadReading:
        """The latest reading: ``owner``'s (the other owners' inference is contention) or, with
        None or an owner not seen yet, the server's."""
        if owner is None:
            return self._reading
        return self._readings.get(owner, self._reading)

    @property
    def gpu_source(self) -> str:
        """Where GPU readings come from: "nvml", "torch.cuda", or "none" (a CPU device, or neither)."""
        return self._gpu.source

    def add_process(self, pid: int | None, owner: str = "") -> None:
        """Count ``pid`` (an inference worker of ``owner``) as this server's own CPU use, not
        another tenant's."""
        if pid is not None:
            p = psutil.Process(pid)
            p.cpu_percent(interval=None)  # prime its counter
            self._helpers.setdefault(owner, []).append(p)

    def pids(self, owner: str | None = None) -> set[int]:
        """The inference worker processes counted as ``owner``'s (None: anyone's)."""
        groups = self._helpers.values() if owner is None else [self._helpers.get(owner, [])]
        return {p.pid for procs in groups for p in procs}

    def _own_cpu(self) -> tuple[float, dict[str, float]]:
        """(this process, {owner: its inference workers}), in cores."""
        front = self._proc.cpu_percent(interval=None) / 100.0  # percent of one core
        workers: dict[str, float] = {}
        for owner, procs in list(self._helpers.items()):
            used = 0.0
            for p in list(procs):
                try:
                    used += p.cpu_percent(interval=None) / 100.0
                except psutil.Error:  # exited (a restarted worker is added again)
                    procs.remove(p)
            workers[owner] = used
        return front, workers

    def _busy_cores(self) -> float:
        """Busy time of ``cpus`` since the previous call, in cores."""
        ticks, before = cpu_ticks(self.cpus), self._ticks
        self._ticks = ticks
        busy = 0.0
        for cpu, (b, t) in ticks.items():
            b0, t0 = before.get(cpu, (b, t))
            if t > t0:
                busy += min(1.0, max(0.0, (b - b0) / (t - t0)))
        return busy

    def add_polling(self, seconds: float) -> None:
        """Reported after a batch the event loop busy-polled for (service/worker.py's
        ``busy_poll``): CPU time that is not front-end work, left out of ``cpu_front``, or the
        thread count would shrink to leave room for a loop that only polls when a core is free."""
        with self._busy_lock:
            self._polling_s += seconds

    def add_busy(self, seconds: float, owner: str = "") -> None:
        """Reported by the scheduler after each batch: time ``owner``'s inference kept the device busy."""
        with self._busy_lock:
            self._busy_s[owner] = self._busy_s.get(owner, 0.0) + seconds

    def sample(self) -> LoadReading:
        """One measurement since the previous call (the first call primes the counters); returns
        the server's reading, and keeps each owner's."""
        busy = self._busy_cores()
        front, workers = self._own_cpu()
        throttle, before = throttle_counts(self.cpu_stat), self._throttle
        self._throttle = throttle
        throttled = throttled_share(before, throttle)
        try:
            gpu = float(self._gpu.read())
        except Exception:  # a GPU that went away must not stop the sampler
            gpu = 0.0
        now = time.monotonic()
        with self._busy_lock:
            device_busy, self._busy_s = self._busy_s, {}
            polling, self._polling_s = self._polling_s, 0.0
        elapsed = max(now - self._last, 1e-6)
        self._last = now
        # the front end's work: the event loop's, not its polling, and only beside worker
        # processes (in-process, forward passes and front end cannot be told apart)
        front_work = max(0.0, front - polling / elapsed) if self._helpers else 0.0

        def view(own_workers: float, own_device_s: float) -> LoadReading:
            return LoadReading(
                cpu=busy / max(len(self.cpus), 1),
                cpu_other=other_share(busy, front + own_workers, len(self.cpus), self.cores),
                gpu=gpu,
                gpu_other=min(1.0, max(0.0, gpu - min(1.0, own_device_s / elapsed))),
                cpu_front=min(1.0, front_work / self.cores),
                cpu_throttled=throttled,
            )

        owners = set(workers) | set(device_busy) | set(self._readings)  # (an owner stays once seen)
        self._readings = {o: view(workers.get(o, 0.0), device_busy.get(o, 0.0)) for o in owners}
        self._reading = view(sum(workers.values()), sum(device_busy.values()))
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


def threads_for(reading: LoadReading, base: int, ncpu: float) -> int:
    """Intra-op threads to use now: at most ``base``, and no more than the cores that other
    processes and this server's own front end (the event loop, when the forward pass runs in a
    worker process) leave free, rounded. An OpenMP fork/join waits for its slowest thread, so on
    cores shared with another busy process two threads are slower than one (measured here:
    docs/RESULTS.md and docs/API.md); on an idle machine this is ``base``."""
    busy = min(max(reading.cpu_other, 0.0) + max(reading.cpu_front, 0.0), 1.0)
    free = ncpu * (1.0 - busy)
    return max(1, min(base, int(free + 0.5)))
