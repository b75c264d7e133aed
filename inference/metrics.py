"""The server's Prometheus metrics (prometheus-client, one registry per server so that several can
live in one process, as in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self, engine, live):
        disable_created_metrics()  # no *_created series: they double the text and no dashboard reads them
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("kvjax_requests", "Requests by how they ended: stop, length, abort (client gone or "
                                "shutdown), error (engine failure), rejected (bad request)", ["status"],
                                registry=registry)
        self.prompt_tokens = Counter("kvjax_prompt_tokens", "Prompt tokens of admitted requests", registry=registry)
        self.generation_tokens = Counter("kvjax_generation_tokens", "Generated tokens", registry=registry)
        self.ttft = Histogram("kvjax_time_to_first_token_seconds", "HTTP request received -> first token",
                              buckets=LATENCY_BUCKETS, registry=registry)
        self.tpot = Histogram("kvjax_time_per_output_token_seconds", "Mean time per output token after the first",
                              buckets=LATENCY_BUCKETS, registry=registry)
        self.kv_bytes_saved = Counter("kvjax_kv_bytes_saved", "KV-cache bytes that compression removed from "
                                      "prompts (slots dropped x bytes per slot)", registry=registry)
        self.compressed = Counter("kvjax_compressed_requests", "Requests by compression method", ["method"],
                                  registry=registry)
        allocator = engine.allocator
        Gauge("kvjax_kv_pages_used", "KV pages in use", registry=registry).set_function(
            lambda: allocator.num_pages - allocator.num_free)
        Gauge("kvjax_kv_pages_free", "KV pages free", registry=registry).set_function(lambda: allocator.num_free)
        Gauge("kvjax_kv_pages_total", "KV pages in the pool", registry=registry).set_function(
            lambda: allocator.num_pages)
        Gauge("kvjax_requests_in_flight", "Requests queued or running", registry=registry).set_function(
            lambda: live.num_in_flight)

    def render(self) -> bytes:
        return generate_latest(self.registry)
