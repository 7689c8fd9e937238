"""Prometheus text exposition for ``/metrics``: counters, gauges and two latency histograms.

Written by hand (the format is a few lines: https://prometheus.io/docs/instrumenting/exposition_formats/)
rather than adding a client library. Names follow vLLM's where one exists, under ``gemmaforge:``.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# Seconds. TTFT spans a queue wait plus a prefill; inter-token latency is one decode step.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self):
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str, help_text: str) -> list[str]:
        out = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        cumulative = 0
        for le, c in zip([*map(str, self.buckets), "+Inf"], self.counts):
            cumulative += c
            out.append(f'{name}_bucket{{le="{le}"}} {cumulative}')
        out += [f"{name}_sum {self.total}", f"{name}_count {self.n}"]
        return out


@dataclass
class Metrics:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens not prefilled thanks to prefix reuse
    completion_tokens: int = 0
    aborted: int = 0
    rejected: int = 0  # 503: queue full
    requests: dict = field(default_factory=dict)  # finish reason -> count
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    inter_token: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))

    def render(self, load: dict) -> str:
        def one(kind, name, help_text, value):
            return [f"# HELP gemmaforge:{name} {help_text}", f"# TYPE gemmaforge:{name} {kind}",
                    f"gemmaforge:{name} {value}"]

        lines = []
        lines += one("gauge", "num_requests_running", "Sequences in KV-cache rows.", load["running"])
        lines += one("gauge", "num_requests_waiting", "Requests waiting for a row.", load["waiting"])
        lines += one("gauge", "kv_cache_usage_perc", "Share of the KV budget's token slots in use.",
                     load["kv_tokens_used"] / max(load["kv_tokens_total"], 1))
        lines += one("gauge", "kv_cache_rows", "KV-cache rows (slots) in the budget.", load["kv_rows_total"])
        lines += one("counter", "prompt_tokens_total", "Prompt tokens received.", self.prompt_tokens)
        lines += one("counter", "prefix_cache_hit_tokens_total", "Prompt tokens served from a cached prefix.",
                     self.cached_tokens)
        lines += one("counter", "generation_tokens_total", "Tokens generated.", self.completion_tokens)
        lines += one("counter", "request_aborted_total", "Requests whose client went away.", self.aborted)
        lines += one("counter", "request_rejected_total", "Requests answered 503 (queue full).", self.rejected)
        lines += ["# HELP gemmaforge:request_success_total Finished requests by finish reason.",
                  "# TYPE gemmaforge:request_success_total counter"]
        for reason in ("stop", "length"):
            lines.append(f'gemmaforge:request_success_total{{finished_reason="{reason}"}} '
                         f"{self.requests.get(reason, 0)}")
        lines += self.ttft.lines("gemmaforge:time_to_first_token_seconds", "Time to first token.")
        lines += self.inter_token.lines("gemmaforge:inter_token_latency_seconds", "Time between tokens of a stream.")
        return "\n".join(lines) + "\n"
