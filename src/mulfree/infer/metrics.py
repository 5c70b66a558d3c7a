"""Prometheus metrics of the server (prometheus-client, one registry per app): requests by endpoint and
status, prompt and completion tokens, queue depth, live sequences, request latency, time to first token, the
prefix cache's hits and size."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.responses import Response

_ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/models", "/health", "/metrics"}


class _BatcherCounts(Collector):
    """The batcher's own counts, read at each scrape: batched decode steps taken, and the prefix cache's hits,
    size and evictions when it has one."""

    def __init__(self, batcher: Any):
        self.batcher = batcher

    def collect(self):
        yield CounterMetricFamily("mulfree_decode_steps", "batched decode steps taken", value=self.batcher.steps)
        cache = self.batcher.cache
        if cache is not None:
            yield CounterMetricFamily("mulfree_prefix_cache_hit_tokens", "prompt tokens whose prefill a cached "
                                      "state skipped", value=cache.hit_tokens)
            yield CounterMetricFamily("mulfree_prefix_cache_evictions", "cached states dropped for room",
                                      value=cache.evictions)
            yield GaugeMetricFamily("mulfree_prefix_cache_bytes", "bytes the cached states take (entries included)",
                                    value=cache.bytes)


class Metrics:
    def __init__(self, batcher: Any):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("mulfree_requests", "HTTP requests answered", ["path", "status"], registry=r)
        self.prompt_tokens = Counter("mulfree_prompt_tokens", "prompt tokens admitted", registry=r)
        self.completion_tokens = Counter("mulfree_completion_tokens", "completion tokens returned", registry=r)
        Gauge("mulfree_queue_depth", "requests waiting for a batch slot", registry=r).set_function(
            lambda: batcher.queue_depth)
        Gauge("mulfree_live_sequences", "sequences in the decode batch", registry=r).set_function(lambda: batcher.live)
        r.register(_BatcherCounts(batcher))
        self.latency = Histogram("mulfree_request_seconds", "completion request latency", ["endpoint"], registry=r)
        self.ttft = Histogram("mulfree_time_to_first_token_seconds", "time to the first generated token", registry=r)
        metrics = self

        class Middleware:
            """Counts every HTTP response by path (known routes only, to bound label values) and status."""

            def __init__(self, app: Any):
                self.app = app

            async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
                if scope["type"] != "http":
                    return await self.app(scope, receive, send)
                path = scope["path"] if scope["path"] in _ROUTES else "other"

                async def counted(message: dict) -> None:
                    if message["type"] == "http.response.start":
                        metrics.requests.labels(path, str(message["status"])).inc()
                    await send(message)

                await self.app(scope, receive, counted)

        self.middleware = Middleware
        self.started = time.time()

    def response(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)
