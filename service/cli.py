"""`dynabert serve`: run the HTTP service (uvicorn).

With no --checkpoint it serves the default model folder (DYNABERT_DEFAULT_MODEL_DIR,
models/sst2-minilm-l6); when that folder does not exist it is first built by
`dynabert train --task sst2 --recipe quick --out <folder>` (progress shown). Flags override the
DYNABERT_* environment; every other setting is read from the environment (service/settings.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.settings import Settings

log = logging.getLogger("dynabert.serve")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve checkpoints over HTTP (FastAPI + uvicorn)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint", action="append", metavar="[NAME=]DIR",
        help="checkpoint folder to serve (repeat for several models; the first of each kind, classification or QA, is its route's default)",
    )  # fmt: skip
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1; 0.0.0.0 in containers)")
    p.add_argument(
        "--port", type=port_number, default=None, help="port, 0-65535 (default 8000; 0: any free one)"
    )
    p.add_argument(
        "--workers", type=int, default=1, help="uvicorn worker processes (metrics in multiprocess mode)"
    )
    p.add_argument("--policy", choices=("sla", "fixed", "max-accuracy"), default=None, help="routing policy")
    p.add_argument("--fixed-width", type=float, default=None, help="width of policy 'fixed'")
    p.add_argument("--fixed-depth", type=float, default=None, help="depth of policy 'fixed'")
    p.add_argument("--budget-ms", type=float, default=None, help="default latency budget")
    p.add_argument("--max-batch-size", type=int, default=None)
    p.add_argument("--max-wait-ms", type=float, default=None)
    p.add_argument("--max-queue", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument(
        "--instances", type=int, default=None,
        help="inference worker processes per model, sharing its queue and the threads (default: one per "
        "thread, at most 4, on a CPU; 1 on a GPU)",
    )  # fmt: skip
    p.add_argument(
        "--no-calibrate", action="store_true", help="skip latency calibration (FLOPs-based profile)"
    )
    p.add_argument("--no-train", action="store_true", help="fail instead of training a missing default model")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=run)


def port_number(text: str) -> int:
    """A TCP port from the command line or DYNABERT_PORT: 0-65535 (the OS would take 99999 as
    99999 mod 65536 and listen somewhere else than the log says)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port {text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 0-65535")
    return port


def listen(host: str, port: int) -> socket.socket:
    """The server's listening socket, taken before the models load: a port in use or an address
    this machine does not have fails at once with one clear line, where uvicorn alone binds only
    after the app's start-up (loading, calibrating) and then exits. It listens at once: a socket
    only bound does not hold the port against another one bound with SO_REUSEADDR (Linux lets
    both bind while neither listens). Connections made while the models load wait in the backlog
    and are answered once the server is ready."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # uvicorn's default backlog
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    return sock


FLAG_TO_SETTING = {
    "policy": "policy",
    "fixed_width": "fixed_width",
    "fixed_depth": "fixed_depth",
    "budget_ms": "default_budget_ms",
    "max_batch_size": "max_batch_size",
    "max_wait_ms": "max_wait_ms",
    "max_queue": "max_queue",
    "device": "device",
    "threads": "torch_threads",
    "instances": "instances",
}


class JsonFormatter(logging.Formatter):
    """Access-log records carry their fields as a dict (``service.app.AccessLine``); wrap them
    with time and level in one JSON line. Any other message becomes ``{"message": ...}``."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.msg
        body = msg if isinstance(msg, dict) and not record.args else {"message": record.getMessage()}
        return json.dumps(
            {
                "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
                "level": record.levelname.lower(),
                "logger": record.name,
                **body,
            },
            separators=(",", ":"),
        )


def configure_access_log() -> None:
    """One JSON line per API request on stdout, separate from the human-readable log."""
    logger = logging.getLogger("dynabert.access")
    if not any(isinstance(h.formatter, JsonFormatter) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(JsonFormatter())
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def build_default_model(folder: Path) -> None:
    """Train the default SST-2 model into ``folder`` (the training CLI shows its progress)."""
    cmd = [
        sys.executable,
        "-m",
        "model.cli",
        "train",
        "--task",
        "sst2",
        "--recipe",
        "quick",
        "--out",
        str(folder),
    ]
    log.info("%s does not exist; building it first: %s", folder, " ".join(cmd[2:]))
    rc = subprocess.call(cmd)
    if rc != 0 or not (folder / "dynabert.json").is_file():
        raise RuntimeError(f"building the default model into {folder} failed (exit code {rc})")


def reexec_with_passive_openmp() -> None:
    """torch's OpenMP threads spin-wait between parallel regions. On a shared or busy machine
    (another process on the cores: exactly the case the SLA policy must handle) that turns a 2 ms
    forward pass into hundreds of ms. OMP_WAIT_POLICY=PASSIVE fixes it, but it is read when the
    OpenMP runtime loads, i.e. at `import torch`; so the serve command re-executes itself once with
    it set (unless the caller set it either way). `dynabert`'s main calls this before it builds its
    parser (whose parts import torch), so the first process never loads torch; ``run`` calls it
    again for a caller that went straight to it."""
    ours = Path(sys.argv[0]).name in ("dynabert", "cli.py")  # the console script or `python -m model.cli`
    if os.environ.get("OMP_WAIT_POLICY") or not ours or "serve" not in sys.argv[1:]:
        return
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    os.execve(sys.executable, [sys.executable, "-m", "model.cli", *sys.argv[1:]], env)


def load_settings(overrides: dict[str, Any]) -> Settings:
    """``Settings`` from the environment and the flags; a bad value is a ValueError naming where it
    came from (``DYNABERT_MAX_BATCH_SIZE`` or ``--max-batch-size``, not pydantic's field name)."""
    from pydantic import ValidationError

    from service.settings import Settings

    try:
        return Settings(**overrides)
    except ValidationError as e:
        flags = {v: "--" + k.replace("_", "-") for k, v in FLAG_TO_SETTING.items()}
        flags.update(checkpoints="--checkpoint", calibrate="--no-calibrate")
        lines = []
        for err in e.errors():
            field = str(err["loc"][0]) if err["loc"] else ""
            if not field:  # a rule across settings
                where = "settings"
            elif field in overrides and field in flags:
                where = flags[field]
            else:
                where = "DYNABERT_" + field.upper()
            lines.append(f"{where}: {err['msg']} (got {err.get('input')!r})")
        raise ValueError("bad setting: " + "; ".join(lines)) from None


def run(args: argparse.Namespace) -> int:
    reexec_with_passive_openmp()
    import uvicorn

    from service.protocol import protocol_class

    overrides: dict[str, Any] = {
        k2: getattr(args, k1) for k1, k2 in FLAG_TO_SETTING.items() if getattr(args, k1) is not None
    }
    if args.checkpoint:
        overrides["checkpoints"] = args.checkpoint
    if args.no_calibrate:
        overrides["calibrate"] = False
    settings = load_settings(overrides)
    host = args.host or os.environ.get("DYNABERT_HOST", "127.0.0.1")
    try:
        port = args.port if args.port is not None else port_number(os.environ.get("DYNABERT_PORT", "8000"))
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"DYNABERT_PORT: {e}") from None
    if not settings.checkpoints and not (settings.default_model_dir / "dynabert.json").exists():
        if args.no_train:
            raise FileNotFoundError(f"default model folder {settings.default_model_dir} is missing")
        listen(host, port).close()  # training takes minutes: say now if the port is taken
        build_default_model(settings.default_model_dir)
    else:
        for name, path in settings.model_dirs():
            if not (path / "dynabert.json").is_file():
                raise FileNotFoundError(f"checkpoint {name!r}: {path.resolve()} has no dynabert.json")
    # one process: the port is taken before any model loads, so a port in use is said at once
    sock = listen(host, port) if args.workers <= 1 else None

    configure_access_log()
    # uvicorn re-raises SIGTERM after its graceful shutdown; a clean stop should exit 0, so the
    # handler it restores and re-raises is a no-op.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    common = dict(
        host=host, port=port, log_level=args.log_level, access_log=False, timeout_graceful_shutdown=30,
        # the limits on a request's headers that uvicorn lacks: time and size
        http=protocol_class(settings.header_timeout_s, settings.max_header_bytes),
        timeout_keep_alive=settings.keep_alive_s,
    )  # fmt: skip
    if sock is not None:
        from service.app import create_app

        class Server(uvicorn.Server):
            async def startup(self, sockets: list[socket.socket] | None = None) -> None:
                await super().startup(sockets=sockets)
                # uvicorn says where it listens only for sockets it bound itself
                at = sock.getsockname()
                where = f"[{at[0]}]:{at[1]}" if sock.family == socket.AF_INET6 else f"{at[0]}:{at[1]}"
                logging.getLogger("uvicorn.error").info(
                    "Uvicorn running on http://%s (Press CTRL+C to quit)", where
                )

        server = Server(uvicorn.Config(create_app(settings), **common))
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:
            pass
        finally:
            sock.close()
        return 0 if server.started else 3  # 3: uvicorn's start-up failure (the lifespan failed)
    # Several workers: each builds its app from the environment; metrics go through a shared folder.
    for k, v in overrides.items():
        os.environ["DYNABERT_" + k.upper()] = json.dumps(v) if isinstance(v, list) else str(v)
    own_dir = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if own_dir:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="dynabert-metrics-")
    metrics_dir = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    metrics_dir.mkdir(parents=True, exist_ok=True)
    for stale in metrics_dir.glob("*.db"):  # a previous run's samples would be counted again
        stale.unlink()
    log.info("%d workers, metrics in %s", args.workers, metrics_dir)
    # a worker loading torch and a model on busy cores can miss the default 5 s health ping
    uvicorn.run(
        "service.app:create_app_from_env",
        factory=True,
        workers=args.workers,
        timeout_worker_healthcheck=60,
        **common,
    )
    if own_dir:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0
