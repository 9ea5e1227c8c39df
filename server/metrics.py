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


class _EngineCollector:
    def __init__(self, stats: Callable[[], EngineStats], model_name: str):
        self.stats = stats
        self.labels = {"model_name": model_name}

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=list(self.labels))
        family.add_metric(list(self.labels.values()), value)
        return family

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc, labels=list(self.labels))
        family.add_metric(list(self.labels.values()), value)
        return family

    def collect(self):
        stats = self.stats()
        yield self._gauge("sinkserve_num_requests_running", "Sequences in the running batch.", stats.num_running)
        yield self._gauge("sinkserve_num_requests_waiting", "Sequences waiting for admission.", stats.num_waiting)
        yield self._gauge("sinkserve_kv_blocks_used", "KV cache blocks held by sequences.", stats.num_kv_blocks_used)
        yield self._gauge("sinkserve_kv_blocks_total", "KV cache blocks in the pool.", stats.num_kv_blocks_total)
        yield self._counter("sinkserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                            stats.prefix_cache_queries)
        yield self._counter("sinkserve_prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                            stats.prefix_cache_hits)
        yield self._counter("sinkserve_prompt_tokens", "Prompt tokens received.", stats.num_prompt_tokens)
        yield self._counter("sinkserve_generation_tokens", "Tokens generated.", stats.num_generation_tokens)
        yield self._counter("sinkserve_preemptions", "Requests preempted for lack of KV blocks.",
                            stats.num_preemptions)
        yield self._counter("sinkserve_sink_evictions", "StreamingLLM evictions (a block, or a sink block's tail).",
                            stats.num_sink_evictions)
        yield self._gauge("sinkserve_sessions_active", "Long sessions holding a KV cache.", stats.num_sessions)
        yield self._counter("sinkserve_session_reused_tokens", "Tokens a session request did not recompute.",
                            stats.num_session_reused_tokens)
        yield self._gauge("sinkserve_sessions_in_host_memory", "Idle sessions whose KV cache is in host memory.",
                          stats.num_sessions_in_host)
        yield self._gauge("sinkserve_session_host_blocks_used", "Host-memory KV blocks holding idle sessions.",
                          stats.num_session_host_blocks_used)
        yield self._gauge("sinkserve_session_host_blocks_total", "Host-memory KV blocks for idle sessions.",
                          stats.num_session_host_blocks_total)
        yield self._counter("sinkserve_sessions_swapped_out", "Idle sessions moved to host memory.",
                            stats.num_sessions_swapped_out)
        yield self._counter("sinkserve_sessions_swapped_in", "Sessions copied back from host memory.",
                            stats.num_sessions_swapped_in)
        yield self._counter("sinkserve_grammars_compiled", "Grammars compiled (cache misses).",
                            stats.num_grammars_compiled)
        yield self._gauge("sinkserve_grammar_cache_entries", "Compiled grammars kept for reuse.",
                          stats.num_grammars_cached)
        yield self._gauge("sinkserve_grammar_cache_bytes", "Memory of the compiled grammars kept, as measured.",
                          stats.grammar_cache_bytes)
        yield self._counter("sinkserve_grammar_errors", "Requests ended because their grammar gave up on a token.",
                            stats.num_grammar_errors)
        yield self._counter("sinkserve_grammar_timeouts", "Requests ended because a grammar mask overran its budget.",
                            stats.num_grammar_timeouts)


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
