"""Prometheus metrics of the decoder, on a registry made in main() (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from clasp.stats import DecodeStats


class DecoderMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.requests = Counter("clasp_requests", "Generate requests by outcome", ["outcome"], registry=r)
        self.time_to_first_token_s = Histogram("clasp_time_to_first_token_seconds", "Time to first token",
                                               registry=r)
        self.time_per_output_token_s = Histogram(
            "clasp_time_per_output_token_seconds", "Decode time per generated token",
            buckets=(0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0), registry=r)
        self.tokens_generated = Counter("clasp_tokens_generated", "Tokens generated", registry=r)
        self.drafts = Counter("clasp_spec_decode_drafts", "Verification rounds that drafted", registry=r)
        self.draft_tokens = Counter("clasp_spec_decode_draft_tokens", "Drafted tokens", registry=r)
        self.accepted_tokens = Counter("clasp_spec_decode_accepted_tokens", "Accepted draft tokens", registry=r)
        self.accepted_per_position = Counter("clasp_spec_decode_accepted_per_position",
                                             "Rounds accepting the draft token at each position", ["position"],
                                             registry=r)
        self.plan_switches = Counter("clasp_plan_switches", "Skip-set changes adopted", registry=r)
        self.plan_age_s = Histogram("clasp_plan_age_seconds", "Age of a plan when the decoder fetched it",
                                    registry=r)
        self.plans_rejected = Counter("clasp_plans_rejected", "Plans rejected as untrustworthy", registry=r)
        self.plan_requests_published = Counter("clasp_plan_requests_published", "Re-plan requests published",
                                               registry=r)
        self.plan_requests_dropped = Counter("clasp_plan_requests_dropped", "Re-plan requests dropped (queue full)",
                                             registry=r)
        self.redis_up = Gauge("clasp_redis_up", "1 when the decoder's Redis connection works", registry=r)
        self.queue_depth = Gauge("clasp_queue_depth", "Requests waiting for a decode slot", registry=r)
        self.active = Gauge("clasp_active_requests", "Requests decoding now", registry=r)
        self.batch_size = Histogram("clasp_batch_size", "Requests advanced together per engine step",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)
        self.waiting_on_client = Gauge("clasp_streams_waiting_on_client",
                                       "Streams whose last message waits for the client to take it (flow control)",
                                       registry=r)
        self.write_wait_s = Histogram("clasp_stream_write_wait_seconds",
                                      "Time a message waited for the client to take it",
                                      buckets=(0.001, 0.01, 0.1, 1.0, 10.0, 60.0), registry=r)
        self.cancelled_rounds = Counter("clasp_cancelled_requests", "Requests stopped early (cancel, deadline, abort)",
                                        ["reason"], registry=r)

    def observe_result(self, stats: DecodeStats, num_tokens: int, decode_seconds: float, num_plans: int) -> None:
        self.tokens_generated.inc(num_tokens)
        self.drafts.inc(stats.num_drafts)
        self.draft_tokens.inc(stats.num_draft_tokens)
        self.accepted_tokens.inc(stats.num_accepted_tokens)
        for position, count in enumerate(stats.accepted_per_position):
            self.accepted_per_position.labels(position=str(position)).inc(count)
        self.plan_switches.inc(max(num_plans - 1, 0))
        if num_tokens > 1:
            self.time_per_output_token_s.observe(decode_seconds / (num_tokens - 1))
