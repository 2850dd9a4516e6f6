"""Prometheus metrics of the server, named in the style of vLLM's `vllm:*` (here `kvevict:*`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

disable_created_metrics()  # the *_created series say when a counter was made: noise for a server's dashboards

FINISH_REASONS = ("stop", "length", "abort", "error")
# the engine's forwards: a prompt chunk alone, a chunk with the running requests' decode step, a decode step alone
FORWARD_KINDS = ("prefill", "packed", "decode")
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                    20.0, 40.0, 80.0, 160.0)


class Metrics:
    """One registry per server, so several servers (tests) in one process never share counters."""

    def __init__(self, model_name: str, kv_budget: int):
        self.registry = registry = CollectorRegistry()
        labels = ["model_name"]

        def gauge(name, doc, extra=()):
            return Gauge(name, doc, [*labels, *extra], registry=registry)

        def counter(name, doc, extra=()):
            return Counter(name, doc, [*labels, *extra], registry=registry)

        self.model_name = model_name
        self._kv_bytes = gauge("kvevict:kv_cache_bytes", "Bytes of K/V (metadata included) held by all requests")
        self._kv_peak = gauge("kvevict:kv_cache_bytes_peak", "Most K/V bytes held at once since the server started")
        self._budget = gauge("kvevict:kv_cache_budget_bytes", "The K/V byte budget (--kv-budget)")
        self._usage = gauge("kvevict:kv_cache_usage_perc", "K/V bytes held as a fraction of the budget")
        self._running = gauge("kvevict:num_requests_running", "Requests in the decode batch")
        self._prefilling = gauge("kvevict:num_requests_prefilling", "Requests whose prompt is being prefilled")
        self._running_peak = gauge("kvevict:num_requests_running_peak", "Most requests decoding at once so far")
        self._waiting = gauge("kvevict:num_requests_waiting", "Requests queued for KV memory")
        self._position = gauge("kvevict:request_queue_position", "Place of each waiting request in the queue (0: next)",
                               ["request_id"])
        self._evicted = counter("kvevict:evicted_tokens", "KV entries evicted, in tokens (entries / (layers x KV heads))")
        self._finished = counter("kvevict:request_success", "Finished requests by finish reason", ["finished_reason"])
        self._prompt = counter("kvevict:prompt_tokens", "Prompt tokens prefilled")
        self._generation = counter("kvevict:generation_tokens", "Tokens generated")
        self._preempted = counter("kvevict:num_preemptions", "Requests preempted (re-queued and recomputed)")
        self._forward_seconds = counter("kvevict:engine_forward_seconds", "Seconds the engine spent in model forwards "
                                        "(eviction included), by kind", ["kind"])
        self._forwards = counter("kvevict:engine_forwards", "Model forwards run by the engine, by kind", ["kind"])
        self._step_seconds = counter("kvevict:engine_step_seconds", "Seconds the engine spent in its steps (forwards, "
                                     "sampling, admission, accounting)")
        self._ttft = Histogram("kvevict:time_to_first_token_seconds", "From arrival to the first token", labels,
                               buckets=_LATENCY_BUCKETS, registry=registry)
        self._itl = Histogram("kvevict:inter_token_latency_seconds", "Between two tokens of a request", labels,
                              buckets=_LATENCY_BUCKETS, registry=registry)
        self._budget.labels(model_name).set(kv_budget)
        self.kv_budget = kv_budget
        for reason in FINISH_REASONS:
            self._finished.labels(model_name, reason)
        for series in (self._evicted, self._prompt, self._generation, self._preempted, self._ttft, self._itl,
                       self._step_seconds):
            series.labels(model_name)  # every series exists from the start, at zero
        for kind in FORWARD_KINDS:
            self._forward_seconds.labels(model_name, kind)
            self._forwards.labels(model_name, kind)
        self.set_state(kv_bytes=0, peak_kv_bytes=0, running=0, prefilling=0, peak_running=0)
        self._queued: set[str] = set()
        self.set_queue([])
        self.set_queue([])

    # the engine's handles
    @property
    def time_to_first_token(self):
        return self._ttft.labels(self.model_name)

    @property
    def inter_token_latency(self):
        return self._itl.labels(self.model_name)

    @property
    def generation_tokens(self):
        return self._generation.labels(self.model_name)

    @property
    def prompt_tokens(self):
        return self._prompt.labels(self.model_name)

    @property
    def evicted_tokens(self):
        return self._evicted.labels(self.model_name)

    @property
    def preemptions(self):
        return self._preempted.labels(self.model_name)

    def request_finished(self, reason: str) -> None:
        self._finished.labels(self.model_name, reason).inc()

    def forward_done(self, kind: str, seconds: float) -> None:
        self._forward_seconds.labels(self.model_name, kind).inc(seconds)
        self._forwards.labels(self.model_name, kind).inc()

    def step_done(self, seconds: float) -> None:
        self._step_seconds.labels(self.model_name).inc(seconds)

    def set_queue(self, request_ids: list[str]) -> None:
        for gone in self._queued - set(request_ids):
            self._position.remove(self.model_name, gone)
        for position, request_id in enumerate(request_ids):
            self._position.labels(self.model_name, request_id).set(position)
        self._queued = set(request_ids)
        self._waiting.labels(self.model_name).set(len(request_ids))

    def set_state(self, kv_bytes: int, peak_kv_bytes: int, running: int, prefilling: int, peak_running: int) -> None:
        name = self.model_name
        self._kv_bytes.labels(name).set(kv_bytes)
        self._kv_peak.labels(name).set(peak_kv_bytes)
        self._usage.labels(name).set(kv_bytes / self.kv_budget)
        self._running.labels(name).set(running)
        self._prefilling.labels(name).set(prefilling)
        self._running_peak.labels(name).set(peak_running)

    def render(self) -> bytes:
        return generate_latest(self.registry)
