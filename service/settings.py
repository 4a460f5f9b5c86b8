"""Server settings: one pydantic-settings ``BaseSettings``, every field read from ``DYNABERT_<NAME>``
(e.g. ``DYNABERT_POLICY=fixed``, ``DYNABERT_CHECKPOINTS='["models/a", "qa=models/b"]'``).

`dynabert serve` flags override the environment; tests build ``Settings(...)`` directly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_MODEL_DIR = Path("models/sst2-minilm-l6")
# the most inference workers per model by default: each holds a copy of the weights and a torch
# runtime, and the threads are split among them (16 cores: 4 workers of 4 threads, each batch on
# the count its profile predicts fastest). Measured on two vCPUs only (docs/RESULTS.md)
AUTO_INSTANCES = 4


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DYNABERT_", extra="ignore", frozen=True)

    # ---- what to serve -------------------------------------------------------------------
    checkpoints: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="checkpoint folders, each 'DIR' or 'NAME=DIR'; the name defaults to the folder "
        "name; the first is the default model. Empty: the default model folder.",
    )
    default_model_dir: Path = Field(
        DEFAULT_MODEL_DIR, description="served when no checkpoint is given (relative to the cwd)"
    )
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:0 ...")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads; 0 keeps torch's default")
    inference_worker: Literal["process", "thread"] = Field(
        "process",
        description="where the forward pass runs: 'process', a worker process per model (its own "
        "interpreter, so the event loop's Python work does not stall it: service/worker.py), or "
        "'thread', a thread of the server process (no second process; tests, debugging)",
    )
    instances: int = Field(
        0,
        ge=0,
        description="inference worker processes per model ('process' only), fed from the model's one "
        "queue, up to one batch each at a time; torch_threads (or torch's count) is split among them. "
        "0 (default): one per torch thread, at most 4, on a CPU with 'process' workers, else 1 "
        "(instances_for). A multi-threaded forward pass uses this VM's cores badly at serving's small "
        "batches (passive OpenMP threads), so single-thread workers side by side run more batches "
        "per second: on two vCPUs two instances kept more requests within budget at the same offered "
        "rates than one (docs/RESULTS.md)",
    )
    busy_poll_ms: float = Field(
        0.0,
        ge=0,
        description="the longest the event loop busy-polls for a batch's answer instead of sleeping, "
        "when the batch is all the work there is (low load) and leaves a core free (service/worker.py, "
        "busy_poll). On some small VMs it took a quarter of a millisecond off each answer; on others "
        "nothing, at a core's time during every lone batch (docs/RESULTS.md). 0 (default): off; try 50",
    )
    adaptive_threads: bool = Field(
        True,
        description="CPU only: calibrate one thread as well as torch_threads, run each batch on the "
        "count its profile predicts fastest, and use fewer threads while other processes keep cores busy",
    )

    # ---- routing policy ------------------------------------------------------------------
    policy: Literal["sla", "fixed", "max-accuracy"] = "sla"
    fixed_width: float = Field(1.0, gt=0, le=1, description="the sub-network of policy 'fixed'")
    fixed_depth: float = Field(1.0, gt=0, le=1)
    default_budget_ms: float = Field(
        100.0, gt=0, description="budget of requests without X-Latency-Budget-Ms"
    )
    budget_margin_ms: float = Field(
        3.0,
        ge=0,
        description="sla keeps this much of each budget for time outside the server's "
        "measured span, which starts at the request's first byte read (the kernel's queues, socket writes, "
        "the client): budgets are end to end",
    )
    max_budget_ms: float = Field(600_000.0, gt=0, description="larger X-Latency-Budget-Ms values are a 400")
    ewma_alpha: float = Field(
        0.2, gt=0, le=1, description="weight of each request in the serving-overhead EWMA"
    )
    feedback_window: int = Field(100, ge=1, description="recent batches whose observed/predicted ratio count")
    meet_window: int = Field(
        1000,
        ge=1,
        description="recent batches whose slow-downs sla's P(meet) counts: longer than feedback_window, "
        "so that the host's rare stalls weigh against larger sub-networks",
    )
    feedback_quantile: float = Field(
        0.9, ge=0, le=1, description="quantile of those ratios applied to predictions (0.5: the median)"
    )
    capacity_quantile: float = Field(
        0.5,
        ge=0,
        le=1,
        description="quantile of those ratios that sla judges a sub-network's sustainable rate at (a "
        "throughput, set by the typical batch; 0.9 judged it as the deadlines are)",
    )
    ewma_idle_decay_s: float = Field(
        10.0, gt=0, description="time constant with which the correction relaxes to 1 without traffic"
    )
    max_utilisation: float = Field(
        0.85, gt=0, description="sla only picks sub-networks whose load at the arrival rate stays under this"
    )
    arrival_rate_tau_s: float = Field(1.0, gt=0, description="time constant of the arrival-rate estimate")
    price_delay: bool = Field(
        True,
        description="sla charges a larger sub-network for the delay its batch imposes on the requests "
        "behind it (the share of recent requests that met their budget by less than that delay)",
    )
    slack_window: int = Field(
        1000, ge=1, description="recent budget-routed requests whose slack prices that delay"
    )
    price_queue: bool = Field(
        False,
        description="sla also weighs each candidate by an M/M/1 estimate of the share of requests that "
        "would meet the budget were the whole arrival rate routed to it (off: the delay price covers "
        "the cost to the requests behind, from observed slacks; the M/M/1 tail ignores batching and "
        "predicted misses several times what this server shows)",
    )
    track_tau_s: float = Field(
        10.0,
        gt=0,
        description="time constant of each sub-network's track record (share of its requests within "
        "budget), which caps an upgrade's P(meet)",
    )
    cpu_sample_interval_s: float = Field(0.25, gt=0, description="background CPU/GPU sampling period")
    cpu_cores: float | None = Field(
        None,
        gt=0,
        description="the CPU time the server may use, in cores, for its load readings, its policy's "
        "capacity and its thread counts (rounded up). Default: read, the CPUs it may run on capped by "
        "its cgroup's CPU quota (1.5 under docker --cpus 1.5 or a Kubernetes limit of 1500m); set it "
        "where the quota is enforced outside what the container can read",
    )

    # ---- scheduler -----------------------------------------------------------------------
    max_batch_size: int = Field(16, ge=1, description="inputs per forward pass")
    max_wait_ms: float = Field(
        0.0, ge=0, description="how long a batch waits for company; 0: batch only what queued up while busy"
    )
    max_queue: int = Field(
        64, ge=1, description="requests waiting or running past which new ones are rejected"
    )
    max_in_flight: int = Field(
        512,
        ge=1,
        description="API requests (POST /v1/*, all models) admitted at once; past it the door answers "
        "queue_full_status with Retry-After before reading the body, routing or tokenising: a cheap "
        "answer, so a front end past its limit (a GPU's single event loop) keeps serving what it "
        "admitted. 512 is a safety valve; about 2x max_batch_size suits a front-end-bound server",
    )
    queue_full_status: Literal[503, 429] = 503
    cancel_on_disconnect: bool = Field(
        True,
        description="take a queued request out of the queue when its client closes the connection "
        "(a client that timed out): its forward pass is never run (HTTP status 499 in the metrics)",
    )
    request_timeout_ms: float = Field(
        0.0,
        ge=0,
        description="timeout of requests without X-Request-Timeout-Ms (or Envoy's "
        "X-Envoy-Expected-Rq-Timeout-Ms): past it the client no longer wants the answer, so a request "
        "predicted to finish later is refused, one still queued leaves the queue unrun and one whose "
        "batch is running loses its answer, each with 504; 0 (default): none",
    )
    shed_late: bool = Field(
        True,
        description="policy sla: reject (queue_full_status + Retry-After) a request that the work "
        "queued ahead makes late on every sub-network although an idle server would meet its budget "
        "(default); false: serve it on the fastest sub-network and report the budget missed",
    )

    # ---- request limits ------------------------------------------------------------------
    max_inputs: int = Field(64, ge=1, description="inputs (texts, pairs, questions) per request")
    max_body_bytes: int = Field(1_000_000, ge=1)
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="from a request's headers to the last byte of its body (POST /v1/*); past it 408 "
        "and the connection closes. A request holds a place at the door only once its body is in, so "
        "clients that stall mid-upload cannot shut the others out",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="dynabert serve: a request's line and headers must arrive within this of the "
        "connection opening (or of the request's first byte, on a kept-alive connection); past it 408 "
        "and close (a connection that sent nothing just closes). uvicorn has no such limit",
    )
    keep_alive_s: float = Field(
        75.0,
        gt=0,
        description="dynabert serve: how long a connection may idle between requests before the "
        "server closes it. Longer than a load balancer's idle timeout (60 s on AWS ALB and nginx's "
        "upstream default), or the balancer may send a request on a connection the server is closing "
        "(a 502). uvicorn's default is 5 s; nginx's own is 75 s",
    )
    max_header_bytes: int = Field(
        65_536,
        ge=1024,
        description="dynabert serve: the most bytes a request's line and headers may take; past it 431 "
        "and close. uvicorn's default parser (httptools) has no such limit",
    )
    gzip_min_bytes: int = Field(
        1400,
        ge=0,
        description="responses of at least this many bytes (a batch's results, /v1/models, /metrics, "
        "/openapi.json) are gzipped for a client whose Accept-Encoding takes gzip; smaller ones, about "
        "one TCP segment, gain nothing. 0: every response",
    )
    gzip_responses: bool = Field(True, description="gzip responses (see gzip_min_bytes); false: never")
    direct_routes: bool = Field(
        True,
        description="the gate hands POST /v1/classify and /v1/qa straight to their handlers, without "
        "FastAPI's routing, dependency solving and inner middleware (the same parsing, validation and "
        "answers, for about 0.3 ms less per request); false: through FastAPI's routes",
    )
    overlong_text: Literal["truncate", "reject"] = Field(
        "truncate", description="text longer than the model's maximum: truncate (header says so) or 413"
    )
    qa_doc_stride: int = Field(128, ge=0, description="context tokens shared by consecutive QA windows")
    qa_max_answer_tokens: int = Field(30, ge=1)
    api_key: SecretStr | None = Field(
        None, description="when set, POST /v1/* need 'Authorization: Bearer KEY'"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="origins whose browser pages may call the API (CORS), e.g. "
        "'https://app.example.com', or '*' for any; a JSON list or comma-separated. Empty (default): "
        "no CORS headers, so browsers allow only same-origin pages",
    )

    # ---- start-up ------------------------------------------------------------------------
    calibrate: bool = Field(True, description="measure every sub-network's latency at start-up")
    profile_cache: bool = Field(True, description="reuse latency_profile.json in the checkpoint folder")
    calibration_batches: tuple[int, ...] = (1, 8)
    calibration_tokens: tuple[int, ...] = (16, 64)
    request_log: bool = Field(True, description="one JSON log line per API request (logger dynabert.access)")

    def instances_for(self, threads: int) -> int:
        """Inference workers per model given torch's intra-op ``threads``: the setting when given;
        by default one per thread, at most AUTO_INSTANCES, with worker processes on a CPU, and one
        otherwise (a thread runs one batch at a time; on a GPU the device, not the cores, runs the
        forward passes, and several contexts on one GPU were not measured)."""
        if self.instances:
            return self.instances
        if self.inference_worker != "process" or self.device != "cpu":
            return 1
        return max(1, min(threads, AUTO_INSTANCES))

    @model_validator(mode="after")
    def _instances_need_processes(self) -> Settings:
        if self.instances > 1 and self.inference_worker != "process":
            raise ValueError(
                f"instances={self.instances} needs inference_worker='process' (a thread runs one batch at a time)"
            )
        return self

    @field_validator("checkpoints", "cors_origins", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        if isinstance(v, str):  # from the environment: a JSON list or a comma-separated one
            if v.strip().startswith("["):
                return json.loads(v)
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    def model_dirs(self) -> list[tuple[str, Path]]:
        """(name, folder) of every model to serve, in order; the first is the default."""
        entries = self.checkpoints or [str(self.default_model_dir)]
        out: list[tuple[str, Path]] = []
        for e in entries:
            name, sep, path = e.partition("=")
            if not sep:
                name, path = "", e
            p = Path(path)
            name = name or p.resolve().name
            if any(name == n for n, _ in out):
                raise ValueError(f"two checkpoints are both named {name!r}; use NAME=DIR to tell them apart")
            out.append((name, p))
        return out
