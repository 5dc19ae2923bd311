"""The server's counters, served at GET /metrics in Prometheus's text format (0.0.4)."""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from collections.abc import Callable

# Request latency buckets, in seconds: searches take seconds to minutes.
BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)  # (endpoint, status) -> count
        self.latency_buckets: dict[str, list[int]] = defaultdict(lambda: [0] * (len(BUCKETS) + 1))
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.latency_count: dict[str, int] = defaultdict(int)
        self.tokens: dict[str, int] = defaultdict(int)  # prompt, generated, reward
        self.searches: dict[str, int] = defaultdict(int)  # algorithm -> searches finished
        self.gauges: dict[str, Callable[[], float]] = {}  # name -> current value

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            self.latency_buckets[endpoint][bisect.bisect_left(BUCKETS, seconds)] += 1
            self.latency_sum[endpoint] += seconds
            self.latency_count[endpoint] += 1

    def search(self, algorithm: str, prompt: int, generated: int, reward: int) -> None:
        with self._lock:
            self.tokens["prompt"] += prompt
            self.tokens["generated"] += generated
            self.tokens["reward"] += reward
            self.searches[algorithm] += 1

    def gauge(self, name: str, read: Callable[[], float]) -> None:
        self.gauges[name] = read

    def text(self) -> str:
        lines = [
            "# HELP itscale_requests_total Requests answered, by endpoint and HTTP status.",
            "# TYPE itscale_requests_total counter",
        ]
        with self._lock:
            for (endpoint, status), count in sorted(self.requests.items()):
                lines.append(f'itscale_requests_total{{endpoint="{endpoint}",status="{status}"}} {count}')
            lines += [
                "# HELP itscale_request_seconds Time to answer a request (a stream: to its last byte).",
                "# TYPE itscale_request_seconds histogram",
            ]
            for endpoint, counts in sorted(self.latency_buckets.items()):
                running = 0
                for bound, count in zip([*BUCKETS, "+Inf"], counts, strict=True):
                    running += count
                    lines.append(f'itscale_request_seconds_bucket{{endpoint="{endpoint}",le="{bound}"}} {running}')
                lines.append(f'itscale_request_seconds_sum{{endpoint="{endpoint}"}} {self.latency_sum[endpoint]:.6f}')
                lines.append(f'itscale_request_seconds_count{{endpoint="{endpoint}"}} {self.latency_count[endpoint]}')
            lines += [
                "# HELP itscale_tokens_total Tokens the searches cost: prompt (evaluated), generated, reward (scored).",
                "# TYPE itscale_tokens_total counter",
            ]
            for kind in ("prompt", "generated", "reward"):
                lines.append(f'itscale_tokens_total{{kind="{kind}"}} {self.tokens[kind]}')
            lines += [
                "# HELP itscale_searches_total Searches finished, by algorithm.",
                "# TYPE itscale_searches_total counter",
            ]
            for algorithm, count in sorted(self.searches.items()):
                lines.append(f'itscale_searches_total{{algorithm="{algorithm}"}} {count}')
        for name, read in sorted(self.gauges.items()):
            lines += [f"# TYPE itscale_{name} gauge", f"itscale_{name} {read():g}"]
        return "\n".join(lines) + "\n"
