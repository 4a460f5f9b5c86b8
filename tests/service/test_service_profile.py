"""Latency profile: the cost-model fit, calibration on a tiny real checkpoint, and the cache."""

from __future__ import annotations

import json

import pytest

from model.checkpoint import load_checkpoint
from service.profile import PROFILE_FILE, Curve, calibrate, fit_curve, flops_profile, load_or_calibrate


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
    assert set(prof.curves) == {subs[0], subs[-1]}
    assert len(prof.points[subs[0]]) == 4 and all(s > 0 for _, _, s in prof.points[subs[0]])
    assert prof.predict(*subs[0], 2, 16) > 0


def test_cache_is_written_reused_and_invalidated(tmp_path, tiny_cls_checkpoint):
    import shutil

    ckdir = tmp_path / "ck"
    shutil.copytree(tiny_cls_checkpoint, ckdir)
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
    data = json.loads((ckdir / PROFILE_FILE).read_text())
    data["key"]["cpus"] = -1
    (ckdir / PROFILE_FILE).write_text(json.dumps(data))
    assert (
        load_or_calibrate(ck.model, subs, ckdir, **{**kw, "timer": lambda *a: 10 * fake_timer(*a)}).source
        == "calibrated"
    )
    # a corrupt cache is not fatal
    (ckdir / PROFILE_FILE).write_text("{not json")
    assert load_or_calibrate(ck.model, subs, ckdir, **kw).source == "calibrated"


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
