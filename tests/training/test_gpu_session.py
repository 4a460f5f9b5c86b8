"""scripts/gpu_session.py: the plan it runs, the deadline that stops it, what it brings back."""

import importlib.util
import json
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gs():
    spec = importlib.util.spec_from_file_location("gpu_session", ROOT / "scripts" / "gpu_session.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_session"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_baselines_wait_for_their_runs_teacher_and_use_it(gs, tmp_path):
    jobs = {j.name: j for j in gs.jobs_for("minilm", "bb", tmp_path / "data", tmp_path, "full", 2)}
    assert set(jobs) == {"sst2", "sst2-separate", "squad", "squad-separate", "mrpc", "mrpc-separate",
                         "mrpc-vanilla", "rte", "rte-separate", "rte-vanilla"}  # fmt: skip
    teacher = tmp_path / "runs" / "mrpc-minilm" / "stages" / "teacher"
    for name in ("mrpc-separate", "mrpc-vanilla"):
        argv = jobs[name].argv
        assert jobs[name].after == teacher / "dynabert.json"
        assert argv[argv.index("--teacher") + 1] == str(teacher)
        assert argv[argv.index("--ablation") + 1] == name.split("-")[1]
    assert jobs["mrpc"].after is None and "--ablation" not in jobs["mrpc"].argv
    # SST-2's distillation stages are cut to one epoch, and its baseline gets the same budget
    for name in ("sst2", "sst2-separate"):
        argv = jobs[name].argv
        sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        assert sets == ["width_stage.epochs=1", "depth_stage.epochs=1"]
        assert argv[argv.index("--recipe") + 1] == "full"


def test_the_mpnet_plan_is_sst2_alone_and_extra_settings_reach_every_run(gs, tmp_path):
    (job,) = gs.jobs_for("mpnet", "mp", tmp_path / "data", tmp_path, "full", 2, ("depth_stage.epochs=1",))
    argv = job.argv
    assert job.name == "sst2" and job.after is None
    assert argv[argv.index("--out") + 1] == str(tmp_path / "runs" / "sst2-mpnet")
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--set"] == ["depth_stage.epochs=1"]
    for j in gs.jobs_for("minilm", "bb", tmp_path, tmp_path, "full", 2, ("seed_x=1",)):
        sets = [j.argv[i + 1] for i, a in enumerate(j.argv) if a == "--set"]
        assert sets[-1] == "seed_x=1", j.name  # after the plan's own, so it wins


def test_the_deadline_stops_what_still_runs_and_a_job_never_started_is_marked(gs, tmp_path):
    py = sys.executable
    jobs = [
        gs.Job("quick", [py, "-c", "print('hi')"], tmp_path / "logs" / "quick.log"),
        gs.Job("slow", [py, "-c", "import time; time.sleep(60)"], tmp_path / "logs" / "slow.log"),
        gs.Job("waits", [py, "-c", "pass"], tmp_path / "logs" / "waits.log", after=tmp_path / "never"),
    ]
    gs.run(jobs, deadline_s=1.5, poll_s=0.1)
    rc = {j.name: j.rc for j in jobs}
    assert rc["quick"] == 0
    assert rc["slow"] is not None and rc["slow"] < 0  # stopped by a signal, not left running
    assert jobs[1].proc.poll() is not None
    assert rc["waits"] == -999 and jobs[2].proc is None
    assert (tmp_path / "logs" / "quick.log").read_text().strip() == "hi"


def test_the_archive_holds_results_and_logs_but_never_weights(gs, tmp_path):
    run = tmp_path / "runs" / "rte-minilm"
    (run / "stages" / "teacher").mkdir(parents=True)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "rte.log").write_text("log\n")
    state = {
        "stages": {
            "teacher": {"eval": {"value": 0.6}},
            "dynabert_w": {"eval": [{"value": 0.5}, {"value": 0.7}]},
        }
    }
    (run / "train_state.json").write_text(json.dumps(state))
    (run / "results.json").write_text(json.dumps({"average": 0.55, "teacher": {"value": 0.6}}))
    for name in ("model.safetensors", "tokenizer.json"):
        (run / name).write_text("x")
    (run / "stages" / "teacher" / "model.safetensors").write_text("x")
    (run / "stages" / "teacher" / "dynabert.json").write_text("{}")
    job = gs.Job("rte", ["x", "--out", str(run)], tmp_path / "logs" / "rte.log", rc=0, started=0.0, ended=2.0)
    rows = gs.summary([job])
    assert rows == [{"run": "rte", "rc": 0, "seconds": 2.0, "average": 0.55, "teacher": 0.6,
                     "stages": {"teacher": {"value": 0.6}, "dynabert_w": {"average": 0.6}}}]  # fmt: skip
    archive = gs.collect([job], tmp_path, tmp_path / "out", {"runs": rows})
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert names == {"session.json", "logs/rte.log", "runs/rte-minilm/train_state.json",
                     "runs/rte-minilm/results.json", "runs/rte-minilm/stages/teacher/dynabert.json"}  # fmt: skip
