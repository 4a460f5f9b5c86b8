"""Latency profile: the cost-model fit, calibration on a tiny real checkpoint, and the cache."""

from __future__ import annotations

import json

import pytest
import torch

from model.checkpoint import load_checkpoint
from service.profile import (
    PROFILE_FILE,
    PROFILE_KEEP,
    Curve,
    LatencyProfile,
    calibrate,
    fit_curve,
    flops_profile,
    load_or_calibrate,
    read_cache,
    thread_counts_to_calibrate,
)


def test_fit_recovers_a_known_curve():
    true = Curve(0.002, 3e-6, 1e-8)
    pts = [(b, t, true(b, t)) for b in (1, 4, 8) for t in (16, 64, 128)]
    got = fit_curve(pts)
    for b, t in [(1, 32), (16, 256), (2, 8)]:
        assert got(b, t) == pytest.approx(true(b, t), rel=1e-6)


def test_fit_keeps_coefficients_non_negative_and_monotone():
    pts = [(1, 16, 0.010), (1, 128, 0.009), (8, 16, 0.012), (8, 128, 0.050)]  # noisy: 128 < 16 at batch 1
    c = fit_curve(pts)
    assert min(c.c0, c.c1, c.c2) >= 0
    assert c(8, 128) >= c(1, 128) >= c(1, 16) > 0
    with pytest.raises(ValueError, match="no positive latency"):
        fit_curve([(1, 1, 0.0)])


def fake_timer(model, w, d, b, t):
    """Deterministic 'measurement': proportional to the sub-network's FLOPs."""
    return 1e-3 + model.cfg.flops(w, d, seq_len=t) * b * 1e-9


def test_calibration_on_a_real_checkpoint_orders_subnetworks(tiny_cls_checkpoint):
    ck = load_checkpoint(tiny_cls_checkpoint)
    subs = ck.config.subnetworks()
    prof = calibrate(ck.model, subs[:1] + subs[-1:], batches=(1, 2), tokens=(8, 16), key={})
    n = torch.get_num_threads()
    assert set(prof.curves) == {subs[0], subs[-1]} and prof.thread_counts == (n,)
    assert len(prof.points[subs[0]][n]) == 4 and all(s > 0 for _, _, s in prof.points[subs[0]][n])
    assert prof.predict(*subs[0], 2, 16) > 0


def test_calibration_measures_every_thread_count_and_restores_torchs(tiny_cls_checkpoint):
    ck = load_checkpoint(tiny_cls_checkpoint)
    subs = ck.config.subnetworks()[:2]
    seen: list[int] = []

    def timer(model, w, d, b, t):
        seen.append(torch.get_num_threads())
        return fake_timer(model, w, d, b, t) * (1.0 if torch.get_num_threads() == 1 else 0.6)

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        prof = calibrate(
            ck.model, subs, batches=(1, 4), tokens=(8, 16), key={}, timer=timer, threads=(2, 1, 2)
        )
        assert torch.get_num_threads() == 3  # restored
    finally:
        torch.set_num_threads(before)
    assert sorted(set(seen)) == [1, 2] and len(seen) == 2 * 2 * 4  # two sub-networks, two counts, 4 points
    assert prof.thread_counts == (1, 2)
    assert all(set(per) == {1, 2} for per in prof.curves.values())
    w, d = subs[0]
    assert prof.best(w, d, 4, 16) == (2, pytest.approx(prof.curves[subs[0]][2](4, 16)))
    assert prof.best(w, d, 4, 16, max_threads=1)[0] == 1  # the load allows one thread
    assert prof.predict(w, d, 4, 16, max_threads=1) > prof.predict(w, d, 4, 16)


def crossing_profile() -> LatencyProfile:
    """One thread: 1 ms + 1 ms per input; two: 3 ms + 0.5 ms per input (they cross at 4 inputs)."""
    one, two = Curve(0.001, 1e-3 / 8, 0.0), Curve(0.003, 0.5e-3 / 8, 0.0)
    return LatencyProfile({(1.0, 1.0): {1: one, 2: two}}, {}, {"threads": 2})


def test_each_batch_runs_on_the_faster_thread_count_and_predictions_stay_monotone():
    prof = crossing_profile()
    assert prof.best(1.0, 1.0, 1, 8)[0] == 1  # small batch: the wake-ups of a second thread cost more
    assert prof.best(1.0, 1.0, 16, 8)[0] == 2  # big batch: the second core pays
    assert prof.best(1.0, 1.0, 16, 8, max_threads=1) == (1, pytest.approx(0.017))
    assert prof.best(1.0, 1.0, 1, 8, max_threads=0)[0] == 1  # nothing allowed: the smallest count
    assert prof.best(1, 1, 4, 8) == (1, pytest.approx(0.005))  # a tie (5 ms each) goes to fewer threads
    times = [prof.predict(1.0, 1.0, b, 8) for b in range(1, 33)]
    assert times == sorted(times) and times[0] == pytest.approx(0.002) and times[-1] == pytest.approx(0.019)
    with pytest.raises(KeyError):
        prof.best(0.5, 0.5, 1, 8)


def test_profile_json_round_trip_keeps_thread_counts_and_reads_the_old_format():
    prof = crossing_profile()
    back = LatencyProfile.from_json(json.loads(json.dumps(prof.to_json())))
    assert back.thread_counts == (1, 2)
    assert back.best(1.0, 1.0, 16, 8) == prof.best(1.0, 1.0, 16, 8)
    old = {"key": {"threads": 2}, "subnetworks": [{"width": 1.0, "depth": 1.0, "curve": [0.001, 0, 0]}]}
    assert LatencyProfile.from_json(old).thread_counts == (2,)  # a cache written before thread counts


def test_thread_counts_to_calibrate():
    assert thread_counts_to_calibrate("cpu", 2) == (1, 2)
    assert thread_counts_to_calibrate("cpu", 8) == (1, 8)
    assert thread_counts_to_calibrate("cpu", 1) == (1,)
    assert thread_counts_to_calibrate("cpu", 4, adaptive=False) == (4,)
    assert thread_counts_to_calibrate("cuda:0", 4) == (4,)


def test_cache_is_written_reused_and_invalidated(tmp_path, tiny_cls_checkpoint):
    import shutil

    ckdir = tmp_path / "ck"
    shutil.copytree(tiny_cls_checkpoint, ckdir)
    (ckdir / PROFILE_FILE).unlink(missing_ok=True)  # (other tests may have served the fixture)
    ck = load_checkpoint(ckdir)
    subs = ck.config.subnetworks()
    kw = dict(device="cpu", batches=(1, 4), tokens=(16, 64), timer=fake_timer)
    first = load_or_calibrate(ck.model, subs, ckdir, **kw)
    assert first.source == "calibrated" and (ckdir / PROFILE_FILE).is_file()
    second = load_or_calibrate(ck.model, subs, ckdir, **kw)
    assert second.source == "cache"
    assert second.predict(1.0, 1.0, 4, 64) == pytest.approx(first.predict(1.0, 1.0, 4, 64))
    # the spot check disagrees (the machine got 10x slower): recalibrate
    slow = load_or_calibrate(ck.model, subs, ckdir, **{**kw, "timer": lambda *a: 10 * fake_timer(*a)})
    assert slow.source == "calibrated"
    # another grid (or hardware, threads, weights) is another key
    data = read_cache(ckdir / PROFILE_FILE)
    data[0]["key"]["cpus"] = -1
    (ckdir / PROFILE_FILE).write_text(json.dumps({"profiles": data}))
    assert (
        load_or_calibrate(ck.model, subs, ckdir, **{**kw, "timer": lambda *a: 10 * fake_timer(*a)}).source
        == "calibrated"
    )

    # measuring another set of thread counts is another grid
    def by_threads(model, w, d, b, t):  # two threads 3x slower, so the profile runs one: the spot
        return fake_timer(model, w, d, b, t) * (
            3.0 if torch.get_num_threads() == 2 else 1.0
        )  # check must too

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = load_or_calibrate(ck.model, subs, ckdir, **{**kw, "threads": (1, 2), "timer": by_threads})
        assert two.source == "calibrated" and two.thread_counts == (1, 2)
        again = load_or_calibrate(ck.model, subs, ckdir, **{**kw, "threads": (1, 2), "timer": by_threads})
        assert again.source == "cache" and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    # the file keeps each key's profile: the two-thread grid's, the one-thread grid's (measured
    # 10x slower), and the other machine's, which it did not replace
    assert len(read_cache(ckdir / PROFILE_FILE)) == 3
    slow_kw = {**kw, "timer": lambda *a: 10 * fake_timer(*a)}
    assert load_or_calibrate(ck.model, subs, ckdir, **slow_kw).source == "cache"
    # a cache file from before it kept several profiles is read as one
    one = next(
        e
        for e in read_cache(ckdir / PROFILE_FILE)
        if "threads" not in e["key"]["grid"] and e["key"]["cpus"] != -1
    )
    (ckdir / PROFILE_FILE).write_text(json.dumps(one))
    assert load_or_calibrate(ck.model, subs, ckdir, **slow_kw).source == "cache"
    # a corrupt cache is not fatal
    (ckdir / PROFILE_FILE).write_text("{not json")
    assert load_or_calibrate(ck.model, subs, ckdir, **kw).source == "calibrated"


def test_the_cache_keeps_the_last_keys_profiles_newest_first(tmp_path, tiny_cls_checkpoint):
    import shutil

    ckdir = tmp_path / "ck"
    shutil.copytree(tiny_cls_checkpoint, ckdir)
    (ckdir / PROFILE_FILE).unlink(missing_ok=True)  # (other tests may have served the fixture)
    ck = load_checkpoint(ckdir)
    subs = ck.config.subnetworks()[:2]
    kw = dict(device="cpu", batches=(1,), timer=fake_timer)
    grids = [(8 * (i + 1),) for i in range(PROFILE_KEEP + 1)]  # a key each
    for tokens in grids:
        assert load_or_calibrate(ck.model, subs, ckdir, tokens=tokens, **kw).source == "calibrated"
    kept = [e["key"]["grid"]["tokens"] for e in read_cache(ckdir / PROFILE_FILE)]
    assert kept == [list(t) for t in reversed(grids)][:PROFILE_KEEP]  # the oldest dropped
    for tokens in grids[1:]:  # configurations switched back and forth: no measuring again
        assert load_or_calibrate(ck.model, subs, ckdir, tokens=tokens, **kw).source == "cache"
    assert load_or_calibrate(ck.model, subs, ckdir, tokens=grids[0], **kw).source == "calibrated"


def test_unwritable_checkpoint_folder_still_calibrates(tmp_path, tiny_cls_checkpoint):
    ck = load_checkpoint(tiny_cls_checkpoint)
    subs = ck.config.subnetworks()[:2]
    ro = tmp_path / "ro"
    (ro / (PROFILE_FILE + ".tmp")).mkdir(parents=True)  # writing the cache fails (as on a read-only volume)
    prof = load_or_calibrate(ck.model, subs, ro, device="cpu", batches=(1,), tokens=(8,), timer=fake_timer)
    assert prof.source == "calibrated" and not (ro / PROFILE_FILE).exists()


def test_flops_profile_orders_by_size(tiny_cls_checkpoint):
    cfg = load_checkpoint(tiny_cls_checkpoint).config
    prof = flops_profile(cfg, cfg.subnetworks())
    assert prof.predict(1.0, 1.0, 1, 128) > prof.predict(0.5, 1.0, 1, 128) > prof.predict(0.25, 0.5, 1, 128)
    assert prof.predict(1.0, 1.0, 8, 128) > prof.predict(1.0, 1.0, 1, 128)


def test_best_is_memoised_per_shape_and_thread_cap():
    """The policy asks best() 10-20 times per request: a repeated question is answered from the
    memo, not by evaluating the curves again, and a different thread cap is a different question."""
    calls: list[tuple[int, int]] = []

    class Counting:
        def __init__(self, curve: Curve) -> None:
            self.curve = curve

        def __call__(self, batch: int, tokens: int) -> float:
            calls.append((batch, tokens))
            return self.curve(batch, tokens)

    fresh = crossing_profile()
    prof = LatencyProfile(
        {k: {n: Counting(c) for n, c in per.items()} for k, per in fresh.curves.items()}, {}, {}
    )
    shapes = [(b, t, cap) for b in (1, 4, 16) for t in (8, 9) for cap in (None, 1, 0)]
    first = [prof.best(1.0, 1.0, b, t, cap) for b, t, cap in shapes]
    evaluated = len(calls)
    assert first == [fresh.best(1.0, 1.0, b, t, cap) for b, t, cap in shapes]
    assert [prof.best(1.0, 1.0, b, t, cap) for b, t, cap in shapes] == first
    assert len(calls) == evaluated  # all from the memo
    assert prof.best(1.0, 1.0, 16, 8)[0] == 2 and prof.best(1.0, 1.0, 16, 8, max_threads=1)[0] == 1


_CALIBRATE_ONE = """
import json, os, sys, time
from pathlib import Path
from model.checkpoint import load_checkpoint
from service.profile import load_or_calibrate
folder, log = Path(sys.argv[1]), Path(sys.argv[2])
ck = load_checkpoint(folder)
(log.parent / f"ready-{os.getpid()}").touch()
while len(list(log.parent.glob("ready-*"))) < 2:  # both start calibrating at the same moment
    time.sleep(0.005)
def timer(model, w, d, b, t):
    t0 = time.time(); time.sleep(0.1); t1 = time.time()
    with open(log, "a") as f:
        f.write(json.dumps([os.getpid(), t0, t1]) + "\\n")
    return 0.001 * (1 + w * d) * b * t / 16
prof = load_or_calibrate(ck.model, ck.config.subnetworks()[:3], folder, device="cpu", batches=(1, 4),
                         tokens=(16,), timer=timer)
print(prof.source)
"""


def test_two_processes_loading_one_checkpoint_take_turns_to_calibrate(tmp_path, tiny_cls_checkpoint):
    """Two inference workers started together (``dynabert serve --workers 2``): without turns both
    calibrate at once, each timing the other's forward passes on the shared cores, and cache that.
    With turns, the second waits, then spot-checks the first one's profile and uses it."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    folder = tmp_path / "ck"
    shutil.copytree(tiny_cls_checkpoint, folder)
    log = tmp_path / "sync" / "timings.jsonl"
    log.parent.mkdir()
    root = Path(__file__).resolve().parents[2]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CALIBRATE_ONE, str(folder), str(log)],
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    assert sorted(out.strip() for out, _ in outs) == ["cache", "calibrated"]
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    per_pid: dict[int, list[tuple[float, float]]] = {}
    for pid, t0, t1 in rows:
        per_pid.setdefault(pid, []).append((t0, t1))
    assert sorted(len(v) for v in per_pid.values()) == [1, 6]  # a spot check; 3 sub-networks x 2 batches
    (check,) = next(v for v in per_pid.values() if len(v) == 1)
    grid = next(v for v in per_pid.values() if len(v) == 6)
    assert check[0] >= max(t1 for _, t1 in grid)  # the spot check came after the whole calibration
