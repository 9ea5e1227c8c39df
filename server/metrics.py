"""Prometheus metrics (prometheus-client), in a registry of the app's own.

Engine state and counters are a snapshot (`EngineStats`) taken when scraped, so the step loop
does no metrics work; latencies are observed on the request side as tokens reach the client.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from scheduler.engine_stats import EngineStats

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0)


GAUGE, COUNTER = GaugeMetricFamily, CounterMetricFamily
# The engine's metrics, read from its EngineStats at each scrape: (name after "sinkserve_", kind, EngineStats
# field, help).
ENGINE_METRICS = (
    ("num_requests_running", GAUGE, "num_running", "Sequences in the running batch."),
    ("num_requests_waiting", GAUGE, "num_waiting", "Sequences waiting for admission."),
    ("kv_blocks_used", GAUGE, "num_kv_blocks_used", "KV cache blocks held by sequences."),
    ("kv_blocks_total", GAUGE, "num_kv_blocks_total", "KV cache blocks in the pool."),
    ("prefix_cache_queries", COUNTER, "prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
    ("prefix_cache_hits", COUNTER, "prefix_cache_hits", "Prompt tokens found in the prefix cache."),
    ("prompt_tokens", COUNTER, "num_prompt_tokens", "Prompt tokens received."),
    ("generation_tokens", COUNTER, "num_generation_tokens", "Tokens generated."),
    ("preemptions", COUNTER, "num_preemptions", "Requests preempted for lack of KV blocks."),
    ("sink_evictions", COUNTER, "num_sink_evictions", "StreamingLLM evictions (a block, or a sink block's tail)."),
    ("sessions_active", GAUGE, "num_sessions", "Long sessions holding a KV cache."),
    ("session_reused_tokens", COUNTER, "num_session_reused_tokens", "Tokens a session request did not recompute."),
    ("sessions_in_host_memory", GAUGE, "num_sessions_in_host", "Idle sessions whose KV cache is in host memory."),
    ("session_host_blocks_used", GAUGE, "num_session_host_blocks_used", "Host-memory KV blocks holding idle sessions."),
    ("session_host_blocks_total", GAUGE, "num_session_host_blocks_total", "Host-memory KV blocks for idle sessions."),
    ("sessions_swapped_out", COUNTER, "num_sessions_swapped_out", "Idle sessions moved to host memory."),
    ("sessions_swapped_in", COUNTER, "num_sessions_swapped_in", "Sessions copied back from host memory."),
    ("grammars_compiled", COUNTER, "num_grammars_compiled", "Grammars compiled (cache misses)."),
    ("grammar_cache_entries", GAUGE, "num_grammars_cached", "Compiled grammars kept for reuse."),
    ("grammar_cache_bytes", GAUGE, "grammar_cache_bytes", "Memory of the compiled grammars kept, as measured."),
    ("grammar_errors", COUNTER, "num_grammar_errors", "Requests ended because their grammar gave up on a token."),
    ("grammar_timeouts", COUNTER, "num_grammar_timeouts", "Requests ended because a grammar mask overran its budget."),
)


class _EngineCollector:
    def __init__(self, stats: Callable[[], EngineStats], model_name: str):
        self.stats = stats
        self.model_name = model_name

    def collect(self):
        stats = self.stats()
        for name, family_type, field, doc in ENGINE_METRICS:
            family = family_type(f"sinkserve_{name}", doc, labels=["model_name"])
            family.add_metric([self.model_name], getattr(stats, field))
            yield family


class Metrics:
    """The app's metrics; `stats` takes the engine's snapshot at each scrape; `served_as`, how the
    model is served (Engine.served_as)."""

    def __init__(self, stats: Callable[[], EngineStats], model_name: str, served_as: dict | None = None):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats, model_name))
        labels = ["model_name"]
        if served_as:
            info = Gauge("sinkserve_model_info", "How the model is served (the value is 1).",
                         labels + ["quantization", "dtype"], registry=self.registry)
            info.labels(model_name, served_as["quantization"], served_as["dtype"]).set(1)
            Gauge("sinkserve_model_weight_bytes", "Bytes of the model's weights as served.", labels,
                  registry=self.registry).labels(model_name).set(served_as["weight_bytes"])
        self.time_to_first_token = Histogram(
            "sinkserve_time_to_first_token_seconds", "Time from arrival to the first output token.",
            labels, buckets=LATENCY_BUCKETS, registry=self.registry).labels(model_name)
        self.inter_token_latency = Histogram(
            "sinkserve_inter_token_latency_seconds", "Time between consecutive output tokens.",
            labels, buckets=LATENCY_BUCKETS, registry=self.registry).labels(model_name)
        self.e2e_latency = Histogram(
            "sinkserve_e2e_request_latency_seconds", "Time from arrival to the last output token.",
            labels, buckets=LATENCY_BUCKETS, registry=self.registry).labels(model_name)
        self._finished = Counter(
            "sinkserve_request_success", "Completions finished, by finish reason.",
            labels + ["finished_reason"], registry=self.registry)
        self.requests_rejected = Counter(
            "sinkserve_requests_rejected", "Requests refused with 503 because the waiting queue was full.",
            labels, registry=self.registry).labels(model_name)
        self.model_name = model_name

    def finished(self, reason: str) -> None:
        self._finished.labels(self.model_name, reason).inc()
