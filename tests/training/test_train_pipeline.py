"""CI smoke run of every stage on a tiny model and ~200 real SST-2 examples: the output is a
loadable checkpoint whose eval.json covers all 12 sub-networks; resume, baselines, the report
and `dynabert eval` work on it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from model.checkpoint import load_checkpoint, read_eval
from model.cli import main as dynabert
from training.pipeline import RunConfig, run_training
from training.recipes import TINY


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_backbone, one_thread) -> Path:
    out = tmp_path_factory.mktemp("train") / "sst2-tiny"
    cache = out.parent / "cache"
    results = run_training(
        RunConfig(task="sst2", out=out, recipe=TINY, backbone=str(tiny_backbone), cache_dir=cache)
    )
    assert results["kind"] == "dynabert"
    for ablation in ("separate", "vanilla"):
        run_training(
            RunConfig(
                task="sst2",
                out=out / "baselines" / ablation,
                recipe=TINY,
                ablation=ablation,
                teacher=out / "stages" / "teacher",
                cache_dir=cache,
            )
        )
    return out


def test_checkpoint_loads_and_eval_covers_the_grid(run_dir):
    ckpt = load_checkpoint(run_dir)
    cfg = ckpt.config
    assert cfg.hidden_size == 32 and cfg.task.name == "sst2" and ckpt.tokenizer is not None
    assert cfg.pooling == "mean"  # --pooling auto: the backbone folder's 1_Pooling asks for mean
    assert load_checkpoint(run_dir / "baselines" / "vanilla").config.pooling == "mean"  # from the teacher
    ev = read_eval(run_dir)
    assert {(e["width"], e["depth"]) for e in ev} == set(cfg.subnetworks()) and len(ev) == 12
    for e in ev:
        assert e["metric"] == "accuracy" and 0.0 <= e["value"] <= 1.0 and e["examples"] == 64
        assert e["params"] == cfg.params(e["width"], e["depth"]) and e["flops"] == cfg.flops(
            e["width"], e["depth"]
        )
        assert e["latency_ms_cpu"] > 0 and e["split"] == "dev"
    prov = ckpt.meta["provenance"]
    assert prov["recipe"]["name"] == "tiny" and prov["seed"] == 42 and prov["data"]["train_examples"] == 200
    assert prov["stage4"] in ("before", "after")  # the tiny recipe runs stage 4 and records its choice


def test_every_stage_ran_and_saved(run_dir):
    state = json.loads((run_dir / "train_state.json").read_text())
    assert list(state["stages"]) == ["teacher", "rewired", "dynabert_w", "dynabert", "final"]
    for stage in ("teacher", "rewired", "dynabert_w", "dynabert"):
        assert (run_dir / "stages" / stage / "model.safetensors").is_file()
    assert state["stages"]["teacher"]["train"]["steps"] == TINY.teacher.steps
    assert len(state["stages"]["dynabert_w"]["eval"]) == 4  # every width at full depth
    # the rewired teacher computes the same function as the teacher
    t = load_checkpoint(run_dir / "stages" / "teacher", load_tokenizer=False).model
    r = load_checkpoint(run_dir / "stages" / "rewired", load_tokenizer=False).model
    import torch

    ids = torch.randint(1000, 5000, (2, 10))
    torch.testing.assert_close(t(ids).logits, r(ids).logits, atol=1e-5, rtol=1e-5)


def test_resume_skips_finished_stages(run_dir, tmp_path, one_thread):
    import shutil

    copy = tmp_path / "resumed"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("baselines"))
    state = json.loads((copy / "train_state.json").read_text())
    del state["stages"]["dynabert"], state["stages"]["final"]  # as if killed during stage 3
    (copy / "train_state.json").write_text(json.dumps(state))
    before = (copy / "stages" / "dynabert_w" / "model.safetensors").read_bytes()
    fast = replace(TINY, latency_repeats=1)
    res = run_training(
        RunConfig(
            task="sst2",
            out=copy,
            recipe=fast,
            backbone="unused-when-resuming",
            resume=True,
            cache_dir=tmp_path / "cache",
        )
    )
    assert (copy / "stages" / "dynabert_w" / "model.safetensors").read_bytes() == before  # not retrained
    assert (
        res["stages"]["teacher"]
        == json.loads((run_dir / "train_state.json").read_text())["stages"]["teacher"]
    )
    assert len(read_eval(copy)) == 12
    with pytest.raises(ValueError, match="cannot resume"):
        run_training(RunConfig(task="rte", out=copy, recipe=fast, resume=True))


def test_from_run_retrains_only_the_later_stages(run_dir, tmp_path, one_thread):
    """--from-run/--upto: stage 3 with another recipe from the very same DynaBERT_w."""
    src_state = json.loads((run_dir / "train_state.json").read_text())
    before = (run_dir / "stages" / "dynabert_w" / "model.safetensors").read_bytes()
    out = tmp_path / "ablation"
    changed = replace(TINY, latency_repeats=1, subnets_per_step=2, subnet_sampling="cost", name="tiny (cost)")
    res = run_training(
        RunConfig(task="sst2", out=out, recipe=changed, from_run=run_dir, cache_dir=tmp_path / "cache")
    )
    state = json.loads((out / "train_state.json").read_text())
    assert state["from_run"] == {"dir": str(run_dir), "stages": ["teacher", "rewired", "dynabert_w"]}
    assert state["recipe"] == "tiny (cost)"
    for k in ("teacher", "rewired", "dynabert_w"):  # taken over, not retrained
        assert state["stages"][k] == src_state["stages"][k]
    assert (out / "stages" / "dynabert_w" / "model.safetensors").read_bytes() == before
    assert (out / "stages" / "dynabert").is_dir() and len(read_eval(out)) == 12
    assert res["stages"]["dynabert"]["train"]["steps"] == TINY.depth_stage.steps
    # a clear error for every misuse, before anything is written
    bad = [
        (dict(out=out, from_run=run_dir), FileExistsError, "already holds a run"),
        (dict(out=tmp_path / "x", from_run=tmp_path), FileNotFoundError, "not a training run"),
        (dict(out=tmp_path / "x", from_run=run_dir, upto="dynabert"), ValueError, "--upto 'dynabert'"),
        (
            dict(out=tmp_path / "x", from_run=run_dir / "baselines" / "vanilla"),
            ValueError,
            "not a DynaBERT run",
        ),
        (dict(out=tmp_path / "x", from_run=run_dir, ablation="separate"), ValueError, "no --ablation"),
    ]
    for kw, err, msg in bad:
        with pytest.raises(err, match=msg):
            run_training(RunConfig(task="sst2", recipe=changed, **kw))
    with pytest.raises(ValueError, match="not a DynaBERT run of 'rte'"):
        run_training(RunConfig(task="rte", out=tmp_path / "y", recipe=changed, from_run=run_dir))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_baselines_and_report(run_dir):
    sep = json.loads((run_dir / "baselines" / "separate" / "results.json").read_text())
    assert [e["width"] for e in sep["separate"]] == [1.0, 0.75, 0.5, 0.25]
    assert all(e["depth"] == 1.0 for e in sep["separate"])
    van = load_checkpoint(run_dir / "baselines" / "vanilla")  # vanilla is a full 12-sub-network model
    assert len(van.eval) == 12
    report = (run_dir / "report.md").read_text()
    assert "| width \\ depth | 1.0x | 0.75x | 0.5x |" in report
    assert "teacher" in report and "separate networks" in report and "Baseline: vanilla" in report
    assert (run_dir / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_cli_rewrites_eval_json(run_dir, tmp_path, capsys, one_thread):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(run_dir, ckpt, ignore=shutil.ignore_patterns("stages", "baselines"))
    (ckpt / "eval.json").unlink()
    assert (
        dynabert(
            [
                "eval",
                str(ckpt),
                "--subnetworks",
                "1.0:1.0,0.25:0.5",
                "--limit",
                "40",
                "--latency-repeats",
                "1",
            ]
        )
        == 0
    )
    ev = read_eval(ckpt)
    assert [(e["width"], e["depth"]) for e in ev] == [(1.0, 1.0), (0.25, 0.5)]
    assert all(e["examples"] == 40 for e in ev)
    assert "accuracy" in capsys.readouterr().out
    assert dynabert(["eval", str(ckpt), "--subnetworks", "0.3:1.0"]) == 2  # not in the grid: a clean error
    assert dynabert(["eval", str(tmp_path / "missing")]) == 2


def test_cli_errors_are_clean(run_dir, tmp_path, caplog):
    teacher = str(run_dir / "stages" / "teacher")
    cases = [  # (options after `train`, what the logged error must say)
        (["--task", "rte", "--teacher", teacher], "was trained on 'sst2', not 'rte'"),
        (
            ["--task", "sst2", "--data-dir", str(tmp_path / "nodata"), "--teacher", teacher],
            "nodata/SST-2/train.tsv: missing",
        ),
        (["--task", "sst2", "--from-run", str(tmp_path / "norun")], "norun: no train_state.json"),
        (["--task", "rte", "--from-run", str(run_dir)], "not a DynaBERT run of 'rte'"),
    ]
    for i, (options, message) in enumerate(cases):
        rc = dynabert(["train", *options, "--out", str(tmp_path / f"out{i}"), "--threads", "1"])
        assert rc == 2 and message in caplog.text, (options, message)
