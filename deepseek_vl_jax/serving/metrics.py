"""Prometheus metrics of one engine, in its own registry (several engines in one process do not collide)."""

from __future__ import annotations

import collections
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.queue_depth = Gauge("dsvl_queue_depth", "requests waiting for a slot", registry=r)
        self.running_slots = Gauge("dsvl_running_slots", "decode slots in use", registry=r)
        self.tokens_per_second = Gauge("dsvl_output_tokens_per_second", "output tokens/s over the last 5 s",
                                       registry=r)
        self.output_tokens = Counter("dsvl_output_tokens", "generated tokens", registry=r)
        self.prompt_tokens = Counter("dsvl_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.prefill_tokens = Counter("dsvl_prefill_tokens", "prompt tokens actually run through prefill", registry=r)
        self.prefix_hits = Counter("dsvl_prefix_cache_hits", "requests that reused a cached prefix", registry=r)
        self.prefix_hit_tokens = Counter("dsvl_prefix_cache_hit_tokens", "prompt tokens restored from the prefix "
                                         "cache", registry=r)
        self.image_hits = Counter("dsvl_image_cache_hits", "images whose features came from the cache", registry=r)
        self.images_encoded = Counter("dsvl_images_encoded", "images run through the vision tower(s)", registry=r)
        self.answer_blocks = Counter("dsvl_answer_blocks_cached", "prefix-cache blocks holding generated tokens, "
                                     "saved at a request's end for the next turn", registry=r)
        self.requests = Counter("dsvl_requests", "finished requests", ["finish_reason"], registry=r)
        self.ttft = Histogram("dsvl_time_to_first_token_seconds", "arrival to first token", buckets=_LATENCY,
                              registry=r)
        self.itl = Histogram("dsvl_inter_token_latency_seconds", "time between two tokens of one sequence",
                             buckets=_LATENCY, registry=r)
        self._recent: collections.deque = collections.deque()

    def tokens(self, count: int) -> None:
        now = time.monotonic()
        self.output_tokens.inc(count)
        self._recent.append((now, count))
        while self._recent and self._recent[0][0] < now - 5.0:
            self._recent.popleft()
        span = max(now - self._recent[0][0], 1e-3) if len(self._recent) > 1 else 5.0
        self.tokens_per_second.set(sum(c for _, c in self._recent) / span)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def read(text: str, name: str) -> float:
    """The value of an unlabelled sample in a Prometheus text exposition (0 if absent), e.g. for tests."""
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "_total "):
            return float(line.split()[-1])
    return 0.0
