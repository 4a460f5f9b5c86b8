"""`torchrun` data parallelism (gloo on the CPU): two ranks train one tiny model together."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

from model.checkpoint import load_checkpoint


def test_torchrun_two_ranks(tmp_path, tiny_backbone):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        port,
        "-m",
        "model.cli",
        "train",
        "--task",
        "sst2",
        "--recipe",
        "tiny",
        "--backbone",
        str(tiny_backbone),
        "--out",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    # own process group, so that a hang kills the ranks too, not only the launcher
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count("average accuracy over sub-networks") == 2  # both ranks finished
    assert len(load_checkpoint(out).eval) == 12
