"""Prometheus metrics, one CollectorRegistry per app (tests build many apps in one process).

Counters/histograms the API observes itself (HTTP requests, chat latency, chat tokens/s)
live here; gauges that belong to other owners (jobs by status and training tokens/s from
the store, queue depth from Redis, adapter cache and GPU memory from the engine) are read
at scrape time by `_StateCollector`, so there is exactly one source of truth for each."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, CounterMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from service.api.deps import AppState

log = logging.getLogger("tuneserve.api.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.http_requests = Counter(
            "tuneserve_http_requests", "HTTP requests by route template, method and status",
            ["route", "method", "status"], registry=self.registry)
        self.http_latency = Histogram(
            "tuneserve_http_request_duration_seconds", "HTTP request latency by route template",
            ["route", "method"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.chat_latency = Histogram(
            "tuneserve_chat_request_duration_seconds", "Chat request latency (whole answer)",
            ["kind", "stream"], registry=self.registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 300))
        self.chat_ttft = Histogram(
            "tuneserve_chat_time_to_first_token_seconds", "Streaming chat: time to first token",
            ["kind"], registry=self.registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32))
        self.chat_tokens_per_second = Histogram(
            "tuneserve_chat_tokens_per_second", "Completion tokens per second of one chat request",
            ["kind"], registry=self.registry,
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000))
        self.chat_tokens = Counter(
            "tuneserve_chat_tokens", "Chat tokens processed", ["kind", "direction"], registry=self.registry)
        self.chat_errors = Counter(
            "tuneserve_chat_errors", "Chat requests that ended in an error, by error code",
            ["code"], registry=self.registry)
        self.jobs_created = Counter(
            "tuneserve_jobs_created", "Fine-tuning jobs accepted", registry=self.registry)
        self.jobs_replayed = Counter(
            "tuneserve_jobs_replayed", "Job creations answered with the job an earlier request with the same "
            "Idempotency-Key created", registry=self.registry)
        self.enqueue_failures = Counter(
            "tuneserve_job_enqueue_failures", "Jobs refused because the broker did not take the task",
            registry=self.registry)
        self.uploads = Counter(
            "tuneserve_file_uploads", "Dataset uploads by outcome", ["outcome"], registry=self.registry)

    def attach(self, state: "AppState") -> None:
        self.registry.register(_StateCollector(state))

    def observe_chat(self, *, adapter: bool, stream: bool, seconds: float, prompt_tokens: int,
                     completion_tokens: int) -> None:
        kind = "adapter" if adapter else "base"
        self.chat_latency.labels(kind, str(stream).lower()).observe(seconds)
        self.chat_tokens.labels(kind, "prompt").inc(prompt_tokens)
        self.chat_tokens.labels(kind, "completion").inc(completion_tokens)
        if seconds > 0 and completion_tokens > 0:
            self.chat_tokens_per_second.labels(kind).observe(completion_tokens / seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _safe(fn: Callable[[], Any]) -> Any:
    # A broken component must not break the scrape: its metric is simply missing.
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        log.debug("metrics source failed: %s", exc)
        return None


class _StateCollector(Collector):
    def __init__(self, state: "AppState"):
        self._state = state

    def describe(self) -> Iterable[Metric]:
        return []  # collected lazily; describing would call the store at registration time

    def collect(self) -> Iterable[Metric]:
        st = self._state
        counts = _safe(st.store.count_jobs_by_status)
        if counts is not None:
            g = GaugeMetricFamily("tuneserve_jobs", "Fine-tuning jobs by status", labels=["status"])
            for status, n in sorted(counts.items()):
                g.add_metric([status], n)
            yield g
        running = _safe(lambda: st.store.jobs_with_status(["running"]))
        if running is not None:
            tps = sum((j.progress.tokens_per_second or 0.0) for j in running)
            yield GaugeMetricFamily("tuneserve_training_tokens_per_second",
                                    "Sum of training tokens/s over running jobs", value=tps)
        depth = _safe(st.queue.depth)
        yield GaugeMetricFamily("tuneserve_queue_depth", "Training tasks waiting in the broker queue",
                                value=float("nan") if depth is None else depth)
        up = 1.0 if st.engine is not None and bool(_safe(st.engine.ready)) else 0.0
        yield GaugeMetricFamily("tuneserve_engine_ready", "1 when the inference engine serves chat", value=up)
        stats = _safe(st.engine.stats) if st.engine is not None else None
        if isinstance(stats, dict):
            yield from _engine_metrics(stats)


# Engine stats (flattened, "_"-joined keys) -> (metric name, help, kind). Other numeric
# stats are exported as gauges `tuneserve_engine_<key>` (and `counters.*` as counters), so
# new engine counters show up without touching this file. Lists (e.g. the resident adapters,
# which carry tenant names) are never exported.
_ENGINE_KNOWN: dict[str, tuple[str, str, str]] = {
    "adapters_hits": ("tuneserve_adapter_cache_hits", "Adapter cache hits (already on the GPU)", "counter"),
    "adapters_misses": ("tuneserve_adapter_cache_misses", "Adapter cache misses", "counter"),
    "adapters_cpu_hits": ("tuneserve_adapter_cache_cpu_hits", "Adapter misses served from the CPU cache",
                          "counter"),
    "adapters_loads": ("tuneserve_adapter_loads", "Adapters loaded from the registry", "counter"),
    "adapters_uploads": ("tuneserve_adapter_uploads", "Adapters uploaded to the GPU pool", "counter"),
    "adapters_evictions": ("tuneserve_adapter_evictions", "Adapters evicted from the GPU pool", "counter"),
    "adapters_cpu_evictions": ("tuneserve_adapter_cpu_evictions", "Adapters evicted from the CPU cache",
                               "counter"),
    "adapters_load_errors": ("tuneserve_adapter_load_errors", "Adapter loads that failed", "counter"),
    "adapters_gpu_resident": ("tuneserve_adapters_gpu_resident", "Adapters resident on the GPU", "gauge"),
    "memory_gpu_allocated_bytes": ("tuneserve_gpu_memory_allocated_bytes", "GPU memory allocated", "gauge"),
    "memory_gpu_reserved_bytes": ("tuneserve_gpu_memory_reserved_bytes", "GPU memory reserved", "gauge"),
    "memory_gpu_max_allocated_bytes": ("tuneserve_gpu_memory_max_allocated_bytes",
                                       "Peak GPU memory allocated", "gauge"),
}


def _flatten(prefix: str, value: Any, out: dict[str, float]) -> None:
    if isinstance(value, bool):
        out[prefix] = float(value)
    elif isinstance(value, (int, float)):
        out[prefix] = float(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            key = "".join(c if c.isalnum() else "_" for c in str(k))
            _flatten(f"{prefix}_{key}" if prefix else key, v, out)


def _engine_metrics(stats: dict[str, Any]) -> Iterable[Metric]:
    flat: dict[str, float] = {}
    _flatten("", stats, flat)
    for key, value in sorted(flat.items()):
        known = _ENGINE_KNOWN.get(key)
        if known:
            name, help_, kind = known
        elif key.startswith("counters_"):
            name, help_, kind = f"tuneserve_engine_{key[len('counters_'):]}", f"engine counter {key}", "counter"
        else:
            name, help_, kind = f"tuneserve_engine_{key}", f"engine stat {key}", "gauge"
        if kind == "counter":
            c = CounterMetricFamily(name, help_)
            c.add_metric([], value)
            yield c
        else:
            yield GaugeMetricFamily(name, help_, value=value)
