"""The service on a real CUDA GPU: skipped where torch sees none (CI has none; a session lent a
GPU machine runs these there, scripts/gpu_serve.sh).

What only a GPU shows: the inference worker process loads and calibrates on the device and
answers as the CPU does; the load sampler reads the GPU's utilisation through NVML; another
process's kernels on the same GPU (bench/hog.py's GPU hog) raise the policy's contention, so
predictions grow before any request is late."""

from __future__ import annotations

import time

import pytest
import torch
from fastapi.testclient import TestClient

from bench.hog import GpuHog
from service.app import create_app
from service.load import LoadMonitor
from service.settings import Settings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TEXTS = ["a gripping, beautifully acted film", "dull and far too long", "it was fine", "x"]
CONTEXT = "The river flows north past the old mill. " * 30 + "Bread is made from flour and water."


def settings(*ckpts, device: str, **kw) -> Settings:
    base = dict(
        checkpoints=[str(c) for c in ckpts],
        device=device,
        calibrate=True,
        profile_cache=False,
        calibration_batches=(1, 4),
        calibration_tokens=(8, 32),
        max_wait_ms=0.0,
    )  # the default inference worker: a process per model, as `dynabert serve` runs
    return Settings(**{**base, **kw})


def answers(c: TestClient) -> tuple[list[dict], list[dict]]:
    cls = c.post("/v1/classify", json={"text": TEXTS}, headers={"X-Latency-Budget-Ms": "10000"})
    qa = c.post("/v1/qa", json={"model": "squad", "question": ["Which way?", "From what?"],
                                "context": [CONTEXT, CONTEXT]})  # fmt: skip
    assert cls.status_code == 200 and qa.status_code == 200, (cls.text, qa.text)
    return cls.json()["results"], qa.json()["results"]


def test_gpu_server_calibrates_on_the_gpu_and_answers_as_the_cpu_does(
    tiny_cls_checkpoint, tiny_qa_checkpoint
):
    ckpts = (tiny_cls_checkpoint, f"squad={tiny_qa_checkpoint}")
    cpu_app = create_app(settings(*ckpts, device="cpu", calibrate=False))
    with TestClient(cpu_app) as c:
        cpu_cls, cpu_qa = answers(c)
    app = create_app(settings(*ckpts, device="cuda"))
    with TestClient(app) as c:
        served = app.state.dynabert.get(None)
        # the forward passes run in the worker process: this one never put weights on the GPU
        assert served.engine.device.type == "cpu" and served.engine.model is None
        prof = served.profile
        assert prof.source == "calibrated" and len(prof.thread_counts) == 1  # no thread choice on a GPU
        assert prof.key["device"] == "cuda" and prof.key["gpu"] == torch.cuda.get_device_name(0)
        assert served.workers  # the forward pass ran in the worker process, on the GPU
        for key in prof.curves:
            t1, t4 = prof.predict(*key, 1, 8), prof.predict(*key, 4, 32)
            assert 0 < t1 <= t4 < 0.5, (key, t1, t4)
        gpu_cls, gpu_qa = answers(c)
        rows = c.get("/v1/models").json()["models"][0]["subnetworks"]
        assert all(r["latency_ms"] > 0 for r in rows)
        metrics = c.get("/metrics").text
        assert "dynabert_gpu_utilization_ratio" in metrics
    for a, b in zip(cpu_cls, gpu_cls, strict=True):
        assert a["label"] == b["label"]
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-4)
    for a, b in zip(cpu_qa, gpu_qa, strict=True):
        assert (a["start"], a["end"], a["answer"]) == (b["start"], b["end"], b["answer"])
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)


def test_nvml_reads_another_process_on_the_gpu_as_contention():
    from service.policy import Policy, Subnet

    monitor = LoadMonitor(interval_s=0.25, device="cuda")
    pytest.importorskip("pynvml")
    assert monitor.gpu_source == "nvml"
    policy = Policy([Subnet(1.0, 1.0, 1, 1, 0.9)], lambda *a: 1e-3, load=monitor.reading, on_gpu=True)
    monitor.sample()
    time.sleep(1.0)
    idle = monitor.sample()
    with GpuHog(device="cuda", size=8192, max_seconds=60):
        deadline, busy = time.monotonic() + 20, idle
        while time.monotonic() < deadline and busy.gpu_other < 0.8:
            time.sleep(0.5)
            busy = monitor.sample()
    assert idle.gpu_other < 0.5, idle  # nothing of ours or anyone else's running (a shared GPU: rare)
    assert busy.gpu >= 0.8 and busy.gpu_other >= 0.8, busy  # not ours: we ran nothing
    assert policy.load_factor(busy) >= 1.8 > policy.load_factor(idle)
