#!/usr/bin/env python3
"""One timed GPU session of training runs: every task's DynaBERT run and its baselines at once.

    python3 scripts/gpu_session.py --backbone DIR --data-dir DIR --work DIR --out DIR \
        [--plan minilm|mpnet] [--deadline-s 540] [--set FIELD=VALUE ...] [--dry-run]

``--plan minilm``: SST-2, MRPC, RTE and SQuAD with their baselines; ``--plan mpnet``: SST-2 on the
base-size backbone (``--set depth_stage.epochs=1`` and the like shorten it). Made for a GPU lent for
minutes (the device tool: one command of at most 10 minutes, nothing fetched there, files back
only through one folder); with a large ``--deadline-s`` it runs everything to the end.

* each task's baselines start as soon as its DynaBERT run has a teacher (they reuse it through
  ``--teacher``), beside the run instead of after it: a MiniLM-sized step leaves an H100/H200
  mostly idle, so the processes share the GPU and the host's cores;
* at ``--deadline-s`` whatever still runs is stopped (SIGTERM, then SIGKILL). Every stage saves
  its state when it ends, so a stopped run still reports the stages it finished;
* the results come back as one archive (``OUT/results.tar.gz``: each run's results.json,
  train_state.json, eval.json, report.md, pareto.png and log, never the weights) and a one-line
  JSON summary per run on stdout.

Standard library only: the machine's own Python runs it, with the repository as the working
directory (``python3 -m model.cli train``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

# What each plan runs: task -> (recipe overrides, baselines). `minilm`: the paper's settings
# (recipe `full`: lr 2e-5, batch 32, 3 epochs a stage, max length 128 / 384, every sub-network
# every step, bf16 autocast) everywhere except SST-2's distillation stages, cut to 1 epoch each:
# 67k examples x 3 epochs x 12 sub-networks does not fit the 10 minutes one device command gets.
PLANS: dict[str, dict[str, tuple[list[str], list[str]]]] = {
    "minilm": {
        "sst2": (["width_stage.epochs=1", "depth_stage.epochs=1"], ["separate"]),
        "squad": ([], ["separate"]),
        "mrpc": ([], ["separate", "vanilla"]),
        "rte": ([], ["separate", "vanilla"]),
    },
    # the CPU rehearsal of the same script (tests and a dry run before spending device time)
    "rehearsal": {
        "mrpc": (
            [
                "train_examples=96",
                "dev_examples=48",
                "teacher.steps=4",
                "width_stage.steps=2",
                "depth_stage.steps=2",
                "final_stage.steps=1",
                "latency_repeats=1",
                "max_length=48",
            ],
            ["separate", "vanilla"],
        ),  # fmt: skip
        "squad": (
            [
                "train_examples=48",
                "dev_examples=16",
                "teacher.steps=2",
                "width_stage.steps=1",
                "depth_stage.steps=1",
                "final_stage=none",
                "latency_repeats=1",
                "max_length_qa=96",
                "doc_stride=32",
            ],
            ["separate"],
        ),  # fmt: skip
    },
    "mpnet": {"sst2": ([], [])},  # the base-size backbone on SST-2 (issue 3), no baselines
}
KEEP = ("results.json", "train_state.json", "eval.json", "report.md", "pareto.png", "dynabert.json")


@dataclass
class Job:
    name: str
    argv: list[str]
    log: Path
    after: Path | None = None  # start once this file exists (a teacher's checkpoint)
    proc: subprocess.Popen | None = None
    started: float | None = None
    ended: float | None = None
    rc: int | None = None


def jobs_for(
    plan: str,
    backbone: str,
    data_dir: Path,
    work: Path,
    recipe: str,
    threads: int,
    extra: tuple[str, ...] = (),
) -> list[Job]:
    """The runs of ``plan``; ``extra`` recipe overrides go to every run, after the plan's own."""
    jobs = []
    for task, (overrides, baselines) in PLANS[plan].items():
        out = work / "runs" / f"{task}-{plan}"
        sets = [a for o in (*overrides, *extra) for a in ("--set", o)]
        base = [sys.executable, "-m", "model.cli", "train", "--task", task, "--backbone", backbone,
                "--data-dir", str(data_dir), "--recipe", recipe, "--threads", str(threads), *sets]  # fmt: skip
        jobs.append(Job(task, [*base, "--out", str(out)], work / "logs" / f"{task}.log"))
        for b in baselines:
            teacher = out / "stages" / "teacher"
            argv = [*base, "--ablation", b, "--teacher", str(teacher), "--out", str(out / "baselines" / b)]
            jobs.append(
                Job(f"{task}-{b}", argv, work / "logs" / f"{task}-{b}.log", after=teacher / "dynabert.json")
            )
    return jobs


def run(jobs: list[Job], deadline_s: float, poll_s: float = 2.0) -> None:
    t0 = time.monotonic()
    last_report = 0.0
    while True:
        now = time.monotonic() - t0
        for j in jobs:
            if j.proc is None and j.rc is None and (j.after is None or j.after.is_file()):
                j.log.parent.mkdir(parents=True, exist_ok=True)
                # own process group: the deadline stops a run and anything it started
                j.proc = subprocess.Popen(j.argv, stdout=j.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
                j.started = now
                print(f"[{now:6.1f}s] start {j.name}", flush=True)
            if j.proc is not None and j.rc is None and j.proc.poll() is not None:
                j.rc, j.ended = j.proc.returncode, now
                print(f"[{now:6.1f}s] end {j.name} rc={j.rc}", flush=True)
        pending = [j for j in jobs if j.rc is None]
        if not pending:
            return
        if now >= deadline_s:
            print(f"[{now:6.1f}s] deadline: stopping {', '.join(j.name for j in pending)}", flush=True)
            for j in pending:
                if j.proc is not None:
                    _signal(j.proc, signal.SIGTERM)
            end = time.monotonic() + 10
            for j in pending:
                if j.proc is not None:
                    try:
                        j.proc.wait(max(0.1, end - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        _signal(j.proc, signal.SIGKILL)
                        j.proc.wait()
                    j.rc, j.ended = j.proc.returncode, time.monotonic() - t0
                else:
                    j.rc = -999  # never started: its teacher was not ready
            return
        if now - last_report >= 30:
            last_report = now
            for j in jobs:
                if j.proc is not None and j.rc is None:
                    print(f"[{now:6.1f}s]   {j.name}: {_last_progress(j.log)}", flush=True)
        time.sleep(poll_s)


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _last_progress(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log yet)"
    for line in reversed(lines):
        if " step " in line or "eval" in line or "done in" in line or "Error" in line:
            return line[-160:]
    return lines[-1][-160:] if lines else "(empty log)"


def summary(jobs: list[Job]) -> list[dict]:
    """One row per job: its exit, its time, each finished stage's metric, the run's averages."""
    rows = []
    for j in jobs:
        out = Path(j.argv[j.argv.index("--out") + 1])
        row: dict = {"run": j.name, "rc": j.rc, "seconds": None if j.started is None or j.ended is None
                     else round(j.ended - j.started, 1)}  # fmt: skip
        state = out / "train_state.json"
        if state.is_file():
            st = json.loads(state.read_text())
            row["stages"] = {k: _stage_metric(v.get("eval")) for k, v in st.get("stages", {}).items()}
        res = out / "results.json"
        if res.is_file():
            r = json.loads(res.read_text())
            row["average"] = r.get("average")
            row["teacher"] = r.get("teacher", {}).get("value")
        rows.append(row)
    return rows


def _stage_metric(ev: dict | list | None) -> dict:
    """A stage's dev metric: one network's value, or the average over its sub-networks."""
    if isinstance(ev, dict):
        return {"value": ev["value"]}
    if isinstance(ev, list) and ev:
        return {"average": round(sum(e["value"] for e in ev) / len(ev), 4)}
    return {}


def collect(jobs: list[Job], work: Path, out_dir: Path, extra: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (work / "session.json").write_text(json.dumps(extra, indent=2) + "\n")
    archive = out_dir / "results.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(work / "session.json", arcname="session.json")
        for log in sorted((work / "logs").glob("*.log")):
            tar.add(log, arcname=f"logs/{log.name}")
        for f in sorted((work / "runs").rglob("*")):
            if f.is_file() and f.name in KEEP:
                tar.add(f, arcname=str(f.relative_to(work)))
    return archive


def environment() -> dict:
    env: dict = {"python": sys.version.split()[0]}
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
    except Exception as e:  # report, do not stop the session
        env["torch_error"] = repr(e)
    try:
        env["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        pass
    env["cpus"] = os.cpu_count()
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", required=True)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="where results.tar.gz goes")
    p.add_argument("--plan", default="minilm", choices=sorted(PLANS))
    p.add_argument("--recipe", default="full")
    p.add_argument("--deadline-s", type=float, default=540.0)
    p.add_argument("--threads", type=int, default=2, help="CPU threads per training process")
    p.add_argument(
        "--set", dest="extra", action="append", default=[], metavar="FIELD=VALUE",
        help="a recipe override for every run (dynabert train --set), after the plan's own",
    )  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = p.parse_args(argv)
    jobs = jobs_for(
        args.plan, args.backbone, args.data_dir, args.work, args.recipe, args.threads, tuple(args.extra)
    )
    if args.dry_run:
        for j in jobs:
            print(j.name, "(after " + str(j.after) + ")" if j.after else "", " ".join(j.argv))
        return 0
    env = environment()
    print(json.dumps(env), flush=True)
    t0 = time.perf_counter()
    run(jobs, args.deadline_s)
    rows = summary(jobs)
    for r in rows:
        print(json.dumps(r), flush=True)
    archive = collect(jobs, args.work, args.out, {"environment": env, "plan": args.plan,
                      "deadline_s": args.deadline_s, "wall_s": round(time.perf_counter() - t0, 1),
                      "commands": {j.name: j.argv for j in jobs}, "runs": rows})  # fmt: skip
    print(f"wrote {archive} ({archive.stat().st_size / 1e6:.1f} MB) after {time.perf_counter() - t0:.0f} s")
    return 0 if all(j.rc == 0 for j in jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
