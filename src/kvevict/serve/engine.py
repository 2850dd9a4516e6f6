"""The serving engine: one thread owns the model and runs requests with continuous batching under a KV byte budget.

Each request gets its own EvictingCache (its policy's own state). The loop, one step at a time:
1. requests cancelled or stopped by the server leave the batch, and their cache is dropped (memory freed at once);
2. the oldest waiting request is admitted when its predicted peak (memory.py) fits next to what the others
   reserve (FIFO: nobody overtakes it);
3. one forward: the next prompt chunk (`prefill_chunk` tokens) of the request being admitted, and one decode step
   for every running request, packed into one sequence (`CacheBatch.joining`) so the rows decode inside the
   chunk's forward; each gets a token and evicts by its own policy on its own schedule; the prefilling request's
   policy evicts after its chunk (its peak is about its target + one chunk), and with its prompt done but its last
   token it joins the decode batch;
4. the bytes held are checked against the budget: a request past its prediction is evicted by its own policy;
   if that is not enough the newest request is preempted (its cache dropped, re-queued first, its prompt and
   output recomputed when it is admitted again, as vLLM's recompute preemption does).
A request decodes exactly as `kvevict.generate` would decode it alone with the same policy (prefill chunks of
the same size, then one token per step).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from ..api import prefill
from ..batch import CacheBatch
from ..cache import EvictingCache
from ..compat import cache_kwargs
from ..contexts import Geometry
from ..policies import Policy
from .memory import PeakEstimate, SideChannels, format_bytes, predict_peak

log = logging.getLogger("kvevict.serve")


class RequestTooLarge(ValueError):
    """The request's predicted peak exceeds the whole KV budget: it could never run."""


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One generation: its prompt, limits and policy; the engine fills in the rest as it runs."""

    prompt_ids: list[int]
    max_tokens: int
    policy: Policy
    sampling: Sampling = field(default_factory=Sampling)
    # called from the engine thread: ("token", id), ("finish", reason) or ("error", message)
    on_event: Callable[[str, object], None] = lambda kind, value: None
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    output_ids: list[int] = field(default_factory=list)
    cache: EvictingCache | None = None
    estimate: PeakEstimate | None = None
    pending: int | None = None  # the token the next decode step feeds
    arrival: float = field(default_factory=time.monotonic)
    last_token_at: float | None = None
    finish_reason: str | None = None
    stop_requested: str | None = None  # set by other threads: "stop" (a stop string) or "abort" (client gone)
    preemptions: int = 0
    peak_nbytes: int = 0
    generator: torch.Generator | None = None

    @property
    def tokens(self) -> list[int]:
        """Everything the request's cache is built from: prompt, then output so far."""
        return self.prompt_ids + self.output_ids

    @property
    def remaining(self) -> int:
        return self.max_tokens - len(self.output_ids)


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """A token from one row of logits: argmax at temperature 0, else nucleus sampling."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p  # the first token always stays
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


class Engine:
    """Continuous batching over one model under `kv_budget` bytes of K/V (metadata included)."""

    def __init__(self, model, tokenizer, kv_budget: int, prefill_chunk: int = 256, metrics=None):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model, self.tokenizer = model, tokenizer
        self.kv_budget, self.prefill_chunk = kv_budget, prefill_chunk
        self.metrics = metrics
        self.geometry = Geometry.of(model)
        config = model.config.get_text_config(decoder=True)
        self.sliding_window = getattr(config, "sliding_window", None)
        self.max_positions = getattr(config, "max_position_embeddings", None)
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self.device = next(model.parameters()).device
        self.side_channels = SideChannels(model, tokenizer)
        self.waiting: deque[Request] = deque()
        self.prefilling: Request | None = None
        self.running: list[Request] = []
        self.batch = CacheBatch(model)
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.peak_running = 0
        self.peak_nbytes = 0
        self.evicted_entries: dict[str, int] = {}

    # ------------------------------------------------------------------ sizing
    def effective_policy(self, policy: Policy) -> Policy:
        """The policy a request runs with: its own, prefilled in the server's chunks unless it sets its own."""
        return policy if policy.prefill_chunk else replace(policy, prefill_chunk=self.prefill_chunk)

    def estimate(self, policy: Policy, prompt_tokens: int, max_tokens: int) -> PeakEstimate:
        state = policy.start(self.geometry, self.tokenizer)
        return predict_peak(self.geometry, self.sliding_window, state, prompt_tokens, max_tokens,
                            policy.prefill_chunk or prompt_tokens, self.side_channels.of(policy))

    # ------------------------------------------------------------------ requests (any thread)
    def submit(self, request: Request) -> None:
        """Queue a request; raises RequestTooLarge when even an empty server could not hold it."""
        request.policy = self.effective_policy(request.policy)
        request.estimate = self.estimate(request.policy, len(request.prompt_ids), request.max_tokens)
        if request.estimate.peak > self.kv_budget:
            raise RequestTooLarge(
                f"this request needs up to {request.estimate.peak:,} bytes of KV cache "
                f"({format_bytes(request.estimate.peak)}: {len(request.prompt_ids)} prompt tokens + {request.max_tokens} "
                f"new tokens with {request.policy.describe()}), more than the server's whole budget of "
                f"{self.kv_budget:,} bytes ({format_bytes(self.kv_budget)}); shorten the prompt, lower max_tokens or "
                "evict more"
            )
        if request.sampling.temperature > 0:
            request.generator = torch.Generator()
            request.generator.manual_seed(request.sampling.seed if request.sampling.seed is not None
                                          else torch.seed())
        with self.cond:
            self.waiting.append(request)
            self._publish_queue()
            self.cond.notify()

    def stop_request(self, request: Request, reason: str = "abort") -> None:
        """Ask the engine to finish `request` ("stop": a stop string was met; "abort": the client left)."""
        with self.cond:
            if request.finish_reason is None and request.stop_requested is None:
                request.stop_requested = reason
                self.cond.notify()

    def nbytes(self) -> int:
        """K/V bytes held by every request's cache right now."""
        requests = self.running + ([self.prefilling] if self.prefilling is not None else [])
        return sum(r.cache.nbytes() for r in requests if r.cache is not None)

    # ------------------------------------------------------------------ the loop
    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="kvevict-engine", daemon=True)
        self.thread.start()

    def shutdown(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not (self.stopping or self.waiting or self.prefilling or self.running):
                    self.cond.wait()
                if self.stopping:
                    break
            try:
                with torch.no_grad():
                    self.step()
            except Exception as err:  # a failed step fails the requests in it, not the server
                log.error("engine step failed:\n%s", traceback.format_exc())
                self._fail_all(f"{type(err).__name__}: {err}")
        self._fail_all("the server is shutting down")

    def step(self) -> None:
        """One turn of the loop (public so tests can drive an engine without its thread)."""
        started = time.perf_counter()
        self._finish_stopped()
        self._admit()
        with torch.no_grad():
            self._forward(self.prefilling)
        if self.prefilling is not None and self.prefilling.cache.seen >= len(self.prefilling.tokens) - 1:
            self._join(self.prefilling)
        self._enforce_budget()
        self._publish()
        if self.metrics is not None:
            self.metrics.step_done(time.perf_counter() - started)

    # ------------------------------------------------------------------ stages
    def _finish_stopped(self) -> None:
        with self.cond:
            stopped = [r for r in self.waiting if r.stop_requested]
            for r in stopped:
                self.waiting.remove(r)
        for r in stopped:
            self._finish(r, r.stop_requested)
        for r in [r for r in self.running if r.stop_requested] + (
                [self.prefilling] if self.prefilling is not None and self.prefilling.stop_requested else []):
            self._finish(r, r.stop_requested)

    def _reserved(self) -> int:
        """Bytes the running requests may still grow to (their decode bound, or more if they already hold more)."""
        return sum(max(r.estimate.decode, r.cache.nbytes() if r.cache is not None else 0) for r in self.running)

    def _admit(self) -> None:
        with self.cond:
            if self.prefilling is not None or not self.waiting:
                return
            head = self.waiting[0]
            if head.remaining != head.max_tokens:  # preempted: re-estimated for what it has left to do
                head.estimate = self.estimate(head.policy, len(head.tokens), head.remaining)
            if self._reserved() + head.estimate.peak > self.kv_budget:
                return  # FIFO: it waits for memory; nobody overtakes it
            self.waiting.popleft()
            self._publish_queue()
        self.prefilling = head
        head.cache = EvictingCache(self.model, head.policy, tokenizer=self.tokenizer)

    def _forward(self, prefilling: Request | None) -> None:
        """One forward: the next prompt chunk of the request being prefilled, and one decode step for every
        running request. Both at once (packed, `CacheBatch.joining`): the rows decode inside the chunk's forward."""
        chunk: list[int] = []
        if prefilling is not None:
            tokens, seen = prefilling.tokens, prefilling.cache.seen
            # the last token is the first decode step's input, as in generate()
            chunk = tokens[seen:min(len(tokens) - 1, seen + prefilling.policy.prefill_chunk)]
        rows = list(self.running)
        started = time.perf_counter()
        if not rows:
            if chunk:
                ids = torch.tensor([prefilling.tokens[:seen + len(chunk)]], device=self.device)
                prefill(self.model, prefilling.cache, ids, torch.ones_like(ids), prefilling.policy.prefill_chunk)
                self._forward_done("prefill", started)
                self._track(prefilling)
            return
        ids = [r.pending for r in rows]
        positions = [r.cache.seen for r in rows]
        if chunk:
            with prefilling.cache.prompt(), self.batch.joining(prefilling.cache, len(chunk)):
                out = self.model(input_ids=torch.tensor([chunk + ids], device=self.device),
                                 position_ids=torch.tensor([list(range(seen, seen + len(chunk))) + positions],
                                                           device=self.device),
                                 **cache_kwargs(self.batch), logits_to_keep=len(rows))
            logits = out.logits[0]
            self._forward_done("packed", started)
            self._track(prefilling)
        else:
            out = self.model(input_ids=torch.tensor(ids, device=self.device).view(-1, 1),
                             position_ids=torch.tensor(positions, device=self.device).view(-1, 1),
                             **cache_kwargs(self.batch), logits_to_keep=1)
            logits = out.logits[:, -1]
            self._forward_done("decode", started)
        self._sampled(rows, logits)

    def _forward_done(self, kind: str, started: float) -> None:
        if self.metrics is not None:
            self.metrics.forward_done(kind, time.perf_counter() - started)

    def _join(self, r: Request) -> None:
        """A request whose prompt is in its cache joins the decode batch."""
        r.pending = r.tokens[-1]
        self.prefilling = None
        self.running.append(r)
        self.batch.add(r.cache)
        self.peak_running = max(self.peak_running, len(self.running))
        if self.metrics is not None and not r.preemptions:
            self.metrics.prompt_tokens.inc(len(r.prompt_ids))

    def _sampled(self, rows: list[Request], logits: torch.Tensor) -> None:
        """Each running request's next token from its row of `logits`; finished ones leave."""
        tokens = [sample(logits[row], r.sampling, r.generator) for row, r in enumerate(rows)]
        now = time.monotonic()
        for r, token in zip(rows, tokens):  # the step's events close together: the server delivers them at once
            if self.metrics is not None:
                if r.last_token_at is None and not r.output_ids:
                    self.metrics.time_to_first_token.observe(now - r.arrival)
                elif r.last_token_at is not None:
                    self.metrics.inter_token_latency.observe(now - r.last_token_at)
                self.metrics.generation_tokens.inc()
            r.last_token_at = now
            r.output_ids.append(token)
            r.pending = token
            self._track(r)
            r.on_event("token", token)
            if token in self.eos_ids:
                self._finish(r, "stop")
            elif r.remaining <= 0:
                self._finish(r, "length")

    def _enforce_budget(self) -> None:
        total = self.nbytes()
        if total <= self.kv_budget:
            return
        log.warning("KV bytes %s over the budget %s: evicting requests past their prediction", total, self.kv_budget)
        for r in self.running:
            if r.cache.nbytes() > r.estimate.decode and r.cache.evicts:
                r.cache.evict(reserve=0)
                self._track(r)
        while self.nbytes() > self.kv_budget and (self.running or self.prefilling):
            newest = self.prefilling if self.prefilling is not None else self.running[-1]
            self._preempt(newest)

    def _preempt(self, r: Request) -> None:
        log.warning("preempting %s (re-queued; recomputed when admitted again)", r.id)
        self._release(r)
        r.preemptions += 1
        if self.metrics is not None:
            self.metrics.preemptions.inc()
        with self.cond:
            self.waiting.appendleft(r)
            self._publish_queue()

    def _release(self, r: Request) -> None:
        """Take the request out of the batch and drop its cache (its memory is freed here)."""
        if self.prefilling is r:
            self.prefilling = None
        if r in self.running:
            self.running.remove(r)
            self.batch.remove(r.cache)
        if r.cache is not None:
            self._count_evicted(r)
        r.cache = None
        self.evicted_entries.pop(r.id, None)

    def _finish(self, r: Request, reason: str) -> None:
        self._release(r)
        r.finish_reason = reason
        if self.metrics is not None:
            self.metrics.request_finished(reason)
        r.on_event("finish", reason)

    def _fail_all(self, message: str) -> None:
        with self.cond:
            requests = list(self.waiting)
            self.waiting.clear()
        requests += self.running + ([self.prefilling] if self.prefilling is not None else [])
        for r in requests:
            self._release(r)
            r.finish_reason = "error"
            if self.metrics is not None:
                self.metrics.request_finished("error")
            r.on_event("error", message)

    # ------------------------------------------------------------------ accounting
    def _track(self, r: Request) -> None:
        r.peak_nbytes = max(r.peak_nbytes, r.cache.nbytes())
        if r.cache.evicts and r.cache._steps_since_eviction == 0:
            self._count_evicted(r)

    def _count_evicted(self, r: Request) -> None:
        """Add the KV entries the request's cache has evicted since last counted to the evicted-tokens total."""
        cache = r.cache
        if self.metrics is None or cache is None or cache.tokens_seen is None or not cache.evicts:
            return
        full = sum(int(cache.tokens_seen[0]) * self.geometry.kv_heads for layer in cache.layers if layer.evictable)
        kept = sum(int(layer.store.seg_len.sum()) for layer in cache.layers if layer.evictable and layer.store)
        evicted = max(full - kept, 0)
        entries_per_token = max(1, len(self.geometry.evictable_layers) * self.geometry.kv_heads)
        before = self.evicted_entries.get(r.id, 0)
        if evicted > before:
            self.metrics.evicted_tokens.inc((evicted - before) / entries_per_token)
            self.evicted_entries[r.id] = evicted

    def _publish_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.set_queue([r.id for r in self.waiting])

    def _publish(self) -> None:
        total = self.nbytes()
        self.peak_nbytes = max(self.peak_nbytes, total)
        if self.metrics is not None:
            self.metrics.set_state(kv_bytes=total, peak_kv_bytes=self.peak_nbytes, running=len(self.running),
                                   prefilling=int(self.prefilling is not None), peak_running=self.peak_running)
