"""Prometheus metrics of the service (names and labels: docs/CONTRACTS.md, a contract with the
dashboards and alert rules in deploy/).

One process: the default registry. Several uvicorn workers: set ``PROMETHEUS_MULTIPROC_DIR`` to an
empty folder *before* the workers start (``dynabert serve --workers N`` does it); every worker then
writes its samples there and ``/metrics`` aggregates all of them (prometheus-client's multiprocess
mode). Gauges declare how the workers' values combine (``multiprocess_mode``).
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
METRIC_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 11))

REQUESTS = Counter(
    "dynabert_requests", "API requests by model, endpoint and HTTP status", ["model", "endpoint", "status"]
)
REQUEST_DURATION = Histogram(
    "dynabert_request_duration_seconds", "Server time of an API request", ["model", "endpoint"],
    buckets=DURATION_BUCKETS,
)  # fmt: skip
QUEUE_WAIT = Histogram(
    "dynabert_queue_wait_seconds",
    "Time a request waited before its batch ran",
    ["model"],
    buckets=DURATION_BUCKETS,
)
INFERENCE_DURATION = Histogram(
    "dynabert_inference_duration_seconds", "Forward pass of one batch", ["model", "width", "depth"],
    buckets=DURATION_BUCKETS,
)  # fmt: skip
SELECTED = Counter(
    "dynabert_subnetwork_selected",
    "Sub-network chosen per request and why",
    ["model", "width", "depth", "reason"],
)
BUDGET = Counter(
    "dynabert_latency_budget", "Requests that met (or missed) their latency budget", ["model", "met"]
)
REJECTED = Counter(
    "dynabert_rejected",
    "Requests turned away before inference: queue_full (the bound on queued requests), "
    "deadline (the queue ahead makes every sub-network miss the budget), shutting_down, "
    "in_flight (the door's bound on admitted requests; model unknown: the body is not read)",
    ["model", "reason"],
)
CLIENT_CLOSED = Counter(
    "dynabert_client_closed",
    "API requests whose client closed the connection before the answer: stage body (before its body "
    "was in; model unknown), queued (taken out of the queue, never run) or running (its batch ran; "
    "the answer was dropped)",
    ["model", "stage"],
)
CONNECTIONS_CLOSED = Counter(
    "dynabert_connections_closed",
    "Connections the server closed because the client passed a limit: reason idle (sent nothing "
    "within DYNABERT_HEADER_TIMEOUT_S of connecting), header_timeout (a request's headers took longer; "
    "408), header_too_large (past DYNABERT_MAX_HEADER_BYTES; 431) or body_timeout (a body took longer "
    "than DYNABERT_BODY_TIMEOUT_S; 408), or bad_http (bytes the HTTP parser refused; 400)",
    ["reason"],
)
for _reason in ("idle", "header_timeout", "header_too_large", "body_timeout", "bad_http"):
    CONNECTIONS_CLOSED.labels(_reason)
DEADLINE_EXCEEDED = Counter(
    "dynabert_deadline_exceeded",
    "API requests answered 504 because their timeout (X-Request-Timeout-Ms) passed or would have: "
    "stage admission (predicted to end after it: the work ahead plus its own batch; never queued), "
    "queued (taken out of the queue, never run) or running (its batch ran; the answer was dropped)",
    ["model", "stage"],
)
BUDGET_SECONDS = Histogram(
    "dynabert_latency_budget_seconds",
    "Latency budget each request asked for",
    ["model"],
    buckets=DURATION_BUCKETS,
)
INFERENCE_THREADS = Counter(
    "dynabert_inference_threads",
    "Forward passes by the intra-op thread count they ran on (chosen per batch from the latency profile)",
    ["model", "threads"],
)
BATCH_SIZE = Histogram("dynabert_batch_size", "Inputs per forward pass", ["model"], buckets=BATCH_BUCKETS)
QUEUE_DEPTH = Gauge(
    "dynabert_queue_depth", "Requests waiting or running", ["model"], multiprocess_mode="livesum"
)
QUEUE_CAPACITY = Gauge(
    "dynabert_queue_capacity",
    "Queue bound past which requests are rejected",
    ["model"],
    multiprocess_mode="livesum",
)
CPU = Gauge(
    "dynabert_cpu_utilization_ratio",
    "CPU utilisation of the cores this server may run on (its affinity: the host without a cpuset), 0..1",
    multiprocess_mode="livemax",
)
CPU_THROTTLED = Gauge(
    "dynabert_cpu_throttled_ratio",
    "Share of its CPU quota's periods (CFS) in which the kernel throttled the server's cgroup, over "
    "the last sampling interval, 0..1 (0 without a quota)",
    multiprocess_mode="livemax",
)
GPU = Gauge(
    "dynabert_gpu_utilization_ratio", "GPU utilisation, 0..1 (0 without a GPU)", multiprocess_mode="livemax"
)
CONTENTION = Gauge(
    "dynabert_contention_factor", "Predicted-latency multiplier the policy applies", ["model"],
    multiprocess_mode="livemax",
)  # fmt: skip
SELECTED_METRIC = Histogram(
    "dynabert_selected_metric", "Dev metric of the chosen sub-network", ["model"], buckets=METRIC_BUCKETS
)
WORKER_RESTARTS = Counter(
    "dynabert_worker_restarts",
    "Inference worker processes started again after one died or hung (service/worker.py)",
    ["model"],
)
MODEL_READY = Gauge(
    "dynabert_model_ready",
    "1 when the model is loaded and calibrated",
    ["model"],
    multiprocess_mode="livemin",
)


def fmt(x: float) -> str:
    """Width/depth label values as CONTRACTS.md spells them: 0.25, 0.5, 0.75, 1.0."""
    return repr(float(x))


def exposition() -> tuple[bytes, str]:
    """The /metrics body and content type, aggregated over workers in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    """Drop a finished worker's live gauges (multiprocess mode only)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)
