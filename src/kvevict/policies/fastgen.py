"""FastGen (Ge et al., "Model Tells You What to Discard: Adaptive KV Cache Compression for LLMs", arXiv 2310.01801).

ICLR 2024. Each (layer, KV head) is profiled once on the prompt and given the cheapest of five hybrid
policies, in this order, whose attention recovery reaches `recovery` (T):

    0 special                          special tokens (BOS/EOS, chat-template tokens)
    1 special+punct                    + tokens made only of punctuation and whitespace
    2 special+punct+frequent           + the top `frequent_ratio` x current length tokens by cumulative attention
    3 special+punct+frequent+local     + the tokens within `local_ratio` x prompt length of the current token
    4 full                             everything

Every candidate also keeps the first `sink_tokens` tokens and the last `window` tokens (the paper's
reproductions protect the first 4 tokens; both are parameters). While decoding each head keeps applying its own
rule: special/punct heads keep only new special/punct tokens, local heads slide their window, frequent heads keep
accumulating attention and drop the lowest, full heads keep everything; so each head's cache length differs and
the storage frees what a head drops.

Choices where the paper is silent (all parameters or documented here):
- Recovery of candidate C for a head = mean over the profiled prompt query rows of the attention mass that
  falls on the keys C keeps *for that row*: the special/punct/sink keys visible to it, the keys within the local
  window before it, and the top ceil(frequent_ratio x visible keys) visible keys ranked by the attention they
  accumulate over the whole prompt (the ranking the head keeps after prefill). Full recovers 1.
- GQA: a KV head is profiled on the mean of its G query heads' attention; cumulative scores are also the group
  mean (units: query rows' worth of attention).
- Cost: the cache's attention path never materialises probabilities, so profiling recomputes them, one block
  of query rows of one layer at a time; after a fresh prefill on CPU from the prefill's own row log-sum-exps
  (exp(s q.k - lse): no softmax passes). `profile_window` = the last prompt rows read (None, the default: every
  row, as the paper; w: the last w rows, so the cumulative scores start from those w queries, SnapKV-style, and
  the cost is about w / prompt length of a full pass). The profiled rows' attention is held until the
  cumulative scores are final; when it would exceed `profile_memory_mb` (fp32, one layer), only the last rows
  that fit are profiled (the cumulative scores still cover every row read). benchmarks/fastgen_profile.py
  compares the two on 4k-token prompts (results/fastgen/profile.md): reading every row costs more than the
  prefill itself on CPU, the last 256 rows a fraction of it.
- Profiling happens once, on the first forward of several tokens (the prompt; with `prefill_chunk`, the first
  chunk). Later chunks and decoded tokens follow the rules chosen then; the local window is fixed to
  ceil(local_ratio x prompt length) tokens.
- `decode_interval` (default 32): the paper re-applies the policy at every step. Here a head's rule is
  re-applied every 32 decoded tokens: a token the rule drops may stay up to 31 steps (at most 32 extra rows
  per head, which is also the free room each head gets after an eviction), and the cost of compaction (one
  copy of the layer's kept rows) is paid once per 32 steps instead of every step. decode_interval=1 gives the
  paper's per-step behaviour (benchmarks/fastgen_profile.py times both against the full cache).
- Compression is an outcome: `kvevict.profiling.achieved_ratio(cache)` is the fraction of (evictable layer,
  KV head, token) entries removed, from the cache's kept counts vs the real tokens seen. With
  `compression_ratio` > 0 the threshold T is searched instead of taken from `recovery`: bisection over the
  per-head recovery values found by profiling (no re-run) for the largest T whose ratio at the end of the prompt
  is >= the target. The ratio is a step function of T (one head changing its choice per step), so the achieved
  ratio exceeds the target by less than one head's step.
- Reports (the per-head table and heat map of `kvevict profile --policy fastgen`) live in kvevict.profiling.
"""

from __future__ import annotations

import string
import time
import unicodedata
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..attention import accumulated_attention, allowed_keys, attention_probs
from .base import Policy, PolicyState, top_k_mask

CANDIDATES = ("special", "special+punct", "special+punct+frequent", "special+punct+frequent+local", "full")
SHORT_NAMES = ("S", "S+P", "S+P+F", "S+P+F+L", "full")
SPECIAL, PUNCT = 1, 2  # token kinds (0: any other token)
KIND_STAT = "fastgen_kind"  # per-row side channel: the token's kind
SCORE_STAT = "fastgen_attention"  # per-row side channel: attention accumulated over queries (group mean)
_ROW_BLOCK = 128  # query rows per block of attention probabilities (bounds memory on long prompts)


# ---------------------------------------------------------------------------------------- token kinds
_KINDS_BY_TOKENIZER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def is_punctuation(text: str) -> bool:
    """Whether a token's text is non-empty and made only of punctuation and whitespace."""
    if not text or "\ufffd" in text:  # a partial UTF-8 byte decodes to U+FFFD: not a punctuation token
        return False
    return all(ch.isspace() or ch in string.punctuation or unicodedata.category(ch).startswith("P") for ch in text)


def special_token_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens: BOS/EOS/PAD..., added tokens marked special, and added tokens that
    the chat template writes (e.g. <|im_start|>, <start_of_turn>)."""
    ids = set(int(i) for i in tokenizer.all_special_ids)
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = "\n".join(template.values())
    for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items():
        content = str(token)
        # markup tokens only: a plain added "\n" also occurs in templates but is punctuation, not special
        in_template = any(ch.isalnum() for ch in content) and content in template
        if getattr(token, "special", False) or in_template:
            ids.add(int(token_id))
    return ids


def token_kinds(tokenizer) -> torch.Tensor:
    """Kind of every vocabulary entry: int8 [vocab] with 1 = special, 2 = punctuation/whitespace, 0 = other.

    Computed once per tokenizer (decoding the whole vocabulary takes up to a few seconds) and cached; computed
    again if tokens are added or the chat template changes.
    """
    signature = (len(tokenizer), str(getattr(tokenizer, "chat_template", None)))
    try:
        cached = _KINDS_BY_TOKENIZER.get(tokenizer)
    except TypeError:  # not weak-referenceable: no cache
        cached = None
    if cached is not None and cached[0] == signature:
        return cached[1]
    size = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(size)])
    kinds = torch.tensor([PUNCT if is_punctuation(t) else 0 for t in texts], dtype=torch.int8)
    special = [i for i in special_token_ids(tokenizer) if 0 <= i < size]
    kinds[special] = SPECIAL
    try:
        _KINDS_BY_TOKENIZER[tokenizer] = (signature, kinds)
    except TypeError:
        pass
    return kinds


# ---------------------------------------------------------------------------------------- per-head rules
def head_keep_mask(
    choice: torch.Tensor,
    kinds: torch.Tensor,
    cumulative: torch.Tensor,
    positions: torch.Tensor,
    last_position: torch.Tensor,
    current_len: torch.Tensor,
    local_window: torch.Tensor,
    frequent_ratio: float,
    sink_tokens: int,
    window: int = 0,
) -> torch.Tensor:
    """What each head's policy keeps now: [B, H, L] bool.

    choice [B, H] (index into CANDIDATES); kinds, cumulative [B, H, L]; positions [B, H, L] relative to each
    row's first real token (-1 = empty slot); last_position, current_len (real tokens seen), local_window
    (tokens) [B].
    """
    valid = positions >= 0
    last = last_position.view(-1, 1, 1)
    c = choice.unsqueeze(-1)
    keep = (positions < sink_tokens) | (positions > last - window) | (kinds == SPECIAL)
    keep |= (c >= 1) & (kinds == PUNCT)
    if bool((choice >= 2).any()):
        budget = torch.ceil(frequent_ratio * current_len.double()).long()  # [B]
        frequent = top_k_mask(cumulative.float().masked_fill(~valid, float("-inf")),
                               budget.view(-1, 1).expand_as(choice))
        keep |= (c >= 2) & frequent
    keep |= (c >= 3) & (positions > last - local_window.view(-1, 1, 1))
    keep |= c >= 4
    return keep & valid


def group_attention(queries, keys, query_positions, key_positions, scaling, query_valid, lse=None) -> torch.Tensor:
    """Causal attention of queries [B, H, G, t, d] over keys [B, H, L, d], mean over the G query heads of each
    KV head: [B, H, t, L] fp32 (rows of padding queries are 0). Positions as in `attention.allowed_keys`.

    `lse` [B, H*G, t]: the rows' log-sum-exps when the layer's own attention computed them (a fresh prefill on
    CPU, `LayerContext.attention_lse`): then each probability is exp(s * q.k - lse), one product and one exp per
    entry instead of a masked softmax, and the mask is applied once per KV head after the group mean.
    """
    B, t = query_valid.shape
    if lse is None:
        probs = attention_probs(queries, keys, query_positions, key_positions, scaling).mean(2)
        return torch.where(query_valid.view(B, 1, t, 1), probs, 0.0)
    H, G, d, L = queries.shape[1], queries.shape[2], queries.shape[-1], keys.shape[2]
    q = queries.float().reshape(B * H, G * t, d) * scaling
    k = keys.float().reshape(B * H, L, d)
    # logit - lse <= 0 for every key a row sees; keys it may not see are capped there too (finite after exp), and
    # zeroed by the mask, a product (several times faster than a select on this CPU)
    probs = torch.baddbmm(-lse.float().reshape(B * H, G * t, 1), q, k.transpose(1, 2)).clamp_max_(0.0).exp_()
    probs = probs.view(B, H, G, t, L).mean(2)
    allowed = allowed_keys(query_positions, key_positions) & query_valid.view(B, 1, t, 1)
    return probs.mul_(allowed)


def choose(recovery: torch.Tensor, threshold) -> torch.Tensor:
    """Index of the first candidate whose recovery reaches `threshold` (full when none does): [...]."""
    ok = recovery >= torch.as_tensor(threshold, dtype=recovery.dtype, device=recovery.device)
    ok[..., -1] = True
    return ok.to(torch.int8).argmax(-1)  # argmax returns the first maximum


def profile_heads(
    probs: torch.Tensor,
    key_kinds: torch.Tensor,
    key_positions: torch.Tensor,
    query_positions: torch.Tensor,
    cumulative: torch.Tensor,
    prompt_len: torch.Tensor,
    recovery: float = 0.95,
    local_ratio: float = 0.3,
    frequent_ratio: float = 0.3,
    sink_tokens: int = 4,
    window: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Profile every KV head on its prompt attention. Returns (choice [B, H], recovery [B, H, 5]).

    probs [B, H, w, L]: attention of the profiled query rows (group-reduced) over the keys; key_kinds [B, H, L]
    (1 special, 2 punct); key_positions [B, H, L] and query_positions [B, w] relative to each row's first real
    token (-1 = empty key slot / padding query, ignored); cumulative [B, H, L]: attention each key accumulated
    over the prompt (ranks the frequent tokens); prompt_len [B] real prompt tokens (sizes the local window).
    recovery[..., c] = mean over the profiled rows of the attention mass on the keys candidate c keeps for that
    row (see the module docstring); choice = the first candidate with recovery >= `recovery`.
    """
    B, H, w, L = probs.shape
    local_window = torch.ceil(local_ratio * prompt_len.double()).long()
    visible = (key_positions >= 0).unsqueeze(2) & (key_positions.unsqueeze(2) <= query_positions.view(B, 1, w, 1))
    probs = torch.where(visible, probs.float(), 0.0)
    mass = torch.zeros(B, H, 5, dtype=torch.float64, device=probs.device)
    add_recovered_mass(mass, probs, query_positions, key_kinds, key_positions, cumulative, local_window,
                       frequent_ratio, sink_tokens, window)
    rows = (query_positions >= 0).sum(-1).clamp(min=1).view(B, 1, 1)
    recovered = (mass / rows).float()
    return choose(recovered, recovery), recovered


def add_recovered_mass(mass, probs, query_positions, key_kinds, key_positions, cumulative, local_window,
                       frequent_ratio: float, sink_tokens: int, window: int) -> None:
    """Add the `recovered_mass` of every row of probs [B, H, t, L] to mass [B, H, 5], _ROW_BLOCK rows at a time
    (bounds the per-row intermediates on long prompts)."""
    ranking = frequency_ranking(cumulative, key_positions)  # the same for every block of rows
    for start in range(0, probs.shape[2], _ROW_BLOCK):
        rows = slice(start, start + _ROW_BLOCK)
        mass += recovered_mass(probs[:, :, rows], query_positions[:, rows], key_kinds, key_positions, cumulative,
                               local_window, frequent_ratio, sink_tokens, window, ranking=ranking)


def frequency_order(cumulative: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
    """Slots in decreasing cumulative attention, empty slots last (stable: ties go to the earlier slot): [B, H, L]."""
    scores = cumulative.float().masked_fill(key_positions < 0, float("-inf"))
    return scores.argsort(dim=-1, descending=True, stable=True)


def frequency_ranking(cumulative: torch.Tensor, key_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank of each slot in `frequency_order`, the positions in that order with empty slots at int32 max), both
    [B, H, L] int32."""
    order = frequency_order(cumulative, key_positions)
    L = order.shape[-1]
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(L, device=order.device).expand_as(order))
    positions = key_positions.to(torch.int32).masked_fill(key_positions < 0, torch.iinfo(torch.int32).max)
    return rank.to(torch.int32), positions.gather(-1, order)


def recovered_mass(
    probs: torch.Tensor,
    query_positions: torch.Tensor,
    key_kinds: torch.Tensor,
    key_positions: torch.Tensor,
    cumulative: torch.Tensor,
    local_window: torch.Tensor,
    frequent_ratio: float,
    sink_tokens: int,
    window: int,
    ranking: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Attention mass each candidate keeps, summed over a block of query rows: [B, H, 5] (float64).

    Same arguments as `profile_heads` for one block of rows (probs [B, H, t, L], zero where a row sees no key;
    query_positions [B, t]); local_window [B] in tokens. The candidates are nested, so each adds a set to the
    previous one: the static sets (sinks, special, punctuation) are column masks, one product per block; a row's
    frequent keys are the first ceil(frequent_ratio x visible) visible keys in `frequency_order`, i.e. the slots
    whose rank in that order is at most the rank of the row's last one, found by a binary search on the running
    count of visible keys in that order (no per-row sort or scatter).
    """
    B, H, t, L = probs.shape
    p = probs.float()
    slot_rank, ordered_positions = frequency_ranking(cumulative, key_positions) if ranking is None else ranking
    key_pos = key_positions.to(torch.int32)
    q_pos = query_positions.to(torch.int32).view(B, 1, t, 1)
    sinks = (key_pos < sink_tokens) | (key_kinds == SPECIAL)
    punct = (key_kinds == PUNCT) & ~sinks
    static = p @ torch.stack([sinks, punct], dim=-1).to(p.dtype)  # [B, H, t, 2]
    rest = p * ~(sinks | punct).unsqueeze(2)  # what the static sets leave (products, not selects: faster here)
    level0 = static[..., 0]
    level1 = static[..., 0] + static[..., 1]
    if window > 0:  # the last `window` tokens before each row belong to every candidate
        band = key_pos.unsqueeze(2) > q_pos - window
        level0 = level0 + torch.where(band & ~sinks.unsqueeze(2), p, 0.0).sum(-1)
        level1 = level1 + torch.where(band, rest, 0.0).sum(-1)
        rest = rest * ~band
    visible_count = (ordered_positions.unsqueeze(2) <= q_pos).cumsum(-1, dtype=torch.int32)
    budget = torch.ceil(frequent_ratio * visible_count[..., -1:].double()).to(torch.int32)  # [B, H, t, 1]
    last = torch.searchsorted(visible_count, budget)  # order index of the row's last frequent key
    last = torch.where(budget > 0, last.to(torch.int32), -1)
    frequent = slot_rank.unsqueeze(2) <= last  # [B, H, t, L]; invisible slots carry no probability
    level2 = level1 + (rest * frequent).sum(-1)
    local = key_pos.unsqueeze(2) > q_pos - local_window.view(B, 1, 1, 1).to(torch.int32)
    level3 = level1 + (rest * (frequent | local)).sum(-1)
    levels = torch.stack([level0, level1, level2, level3, p.sum(-1)], dim=-1)  # [B, H, t, 5]
    return levels.double().sum(2)


def search_threshold(recovery: torch.Tensor, kept: torch.Tensor, total: float, target: float) -> tuple[float, float]:
    """Largest threshold T whose compression ratio is >= `target`, by bisection. Returns (T, ratio).

    recovery, kept [N, 5]: each head's recovery and kept tokens per candidate; total: tokens a full cache holds
    over those N heads. ratio(T) = 1 - sum_n kept[n, choice_n(T)] / total is non-increasing in T and changes only
    at the recovery values, so the search runs over those values (plus 0 and 1): exact, no re-profiling.
    """
    values = torch.cat([recovery.flatten().clamp(0.0, 1.0), recovery.new_tensor([0.0, 1.0])]).unique()  # sorted

    def ratio(t: torch.Tensor) -> float:
        choice = choose(recovery, t).long()
        return 1.0 - float(kept.gather(-1, choice.unsqueeze(-1)).sum()) / total

    if ratio(values[0]) < target:
        warnings.warn(
            f"fastgen: compression_ratio={target:g} is out of reach; the most FastGen removes here is "
            f"{ratio(values[0]):.4f} (every head on its cheapest policy, T=0)",
            stacklevel=3,
        )
        return 0.0, ratio(values[0])
    low, high = 0, len(values) - 1  # invariant: ratio(values[low]) >= target
    if ratio(values[high]) >= target:
        low = high
    while high - low > 1:
        mid = (low + high) // 2
        if ratio(values[mid]) >= target:
            low = mid
        else:
            high = mid
    return float(values[low]), ratio(values[low])


# ---------------------------------------------------------------------------------------- the policy
@dataclass
class LayerProfile:
    recovery: torch.Tensor  # [B, H, 5]
    kept: torch.Tensor  # [B, H, 5] tokens each candidate keeps at the end of the prompt
    local_window: torch.Tensor  # [B] tokens
    prompt_len: torch.Tensor  # [B] real tokens
    rows: int  # query rows profiled (fewest over the batch)


class FastGenState(PolicyState):
    """One cache's profiles, the choices made from them, and the token-kind look-up of its tokenizer."""

    def __init__(self, policy: FastGenPolicy, geometry, tokenizer=None):
        super().__init__(policy, geometry, tokenizer)
        self.profiles: dict[int, LayerProfile] = {}
        self.choices: dict[int, torch.Tensor] | None = None  # made lazily from the profiles, with T
        self.thresholds: torch.Tensor | None = None  # [B] the T each row's choices were made with
        self.kind_table: torch.Tensor | None = None  # kind of every vocabulary id, on the ids' device
        self.last_ids: torch.Tensor | None = None  # the forward's ids and their kinds, shared by its layers
        self.last_kinds: torch.Tensor | None = None
        self.profile_seconds = 0.0

    @property
    def evicts(self) -> bool:
        return True  # sized by recovery, not by a ratio: every head applies its rule

    def resized(self, policy: FastGenPolicy) -> FastGenState:
        twin = super().resized(policy)
        twin.choices = twin.thresholds = None  # re-chosen with the new policy's T or target ratio
        if policy.tokenizer is not None and policy.tokenizer is not self.tokenizer:
            twin.tokenizer, twin.kind_table, twin.last_ids = policy.tokenizer, None, None
        return twin

    # ------------------------------------------------------------------ token ids
    def initial_stats(self, layer_idx, forward):
        input_ids = forward.input_ids
        if input_ids is None:
            raise ValueError("fastgen reads token ids: call the model with input_ids (not inputs_embeds)")
        if input_ids is not self.last_ids:  # one look-up per forward, shared by the layers
            if self.kind_table is None:
                if self.tokenizer is None:
                    raise ValueError("fastgen needs the tokenizer to find special and punctuation tokens: pass "
                                     "tokenizer= to make_policy or EvictingCache (kvevict.generate/answer pass "
                                     "theirs)")
                self.kind_table = token_kinds(self.tokenizer).to(input_ids.device)
            table = self.kind_table
            known = input_ids < table.numel()  # ids past the tokenizer's vocabulary (padded embeddings): other
            self.last_kinds = torch.where(known, table[input_ids.clamp(max=table.numel() - 1)], 0).float()
            self.last_ids = input_ids
        return {KIND_STAT: self.last_kinds.unsqueeze(1).expand(-1, self.geometry.kv_heads, -1)}

    # ------------------------------------------------------------------ observation
    def observe(self, layer_idx, ctx):
        if layer_idx not in self.profiles and ctx.queries.shape[-2] > 1:
            self._profile_layer(layer_idx, ctx)
        elif self._tracks_attention(layer_idx):
            group = ctx.queries.shape[2]
            acc = accumulated_attention(ctx.queries, ctx.view.keys, ctx.query_positions, ctx.view.positions,
                                        ctx.scaling, ctx.query_valid, ctx.sliding_window)
            ctx.add_stat(SCORE_STAT, acc / group)

    def _tracks_attention(self, layer_idx: int) -> bool:
        """Cumulative attention is needed before profiling and, after it, for layers with a frequent head."""
        if layer_idx not in self.profiles:
            return True
        choice = self._resolve()[layer_idx]
        return bool(((choice >= 2) & (choice <= 3)).any())

    def _profile_layer(self, layer_idx, ctx) -> None:
        """Read the prompt's attention block by block: cumulative scores and each candidate's recovery."""
        policy = self.policy
        started = time.perf_counter()
        queries, keys, key_positions = ctx.queries, ctx.view.keys, ctx.view.positions
        B, H, G, T, _ = queries.shape
        L = keys.shape[2]
        read = T if policy.profile_window is None else min(T, policy.profile_window)
        # rows of group-reduced attention kept until the cumulative scores are final (fp32, one layer at a time)
        fit = int(policy.profile_memory_mb * 2**20) // max(1, B * H * L * 4)
        profiled = max(1, min(read, fit))
        first_read, first_profiled = T - read, T - profiled
        block = max(16, min(512, 2**24 // max(1, B * H * G * L)))  # about 64 MiB of logits per block
        totals = torch.zeros(B, H, L, dtype=torch.float32, device=keys.device)
        lse = ctx.attention_lse if ctx.sliding_window is None else None  # the prefill's own row normalisers
        kept_blocks = []
        for start in range(first_read, T, block):
            stop = min(T, start + block)
            # keys past the block's last query are invisible to it: only the visible prefix of slots is read
            seen = ((key_positions >= 0) & (key_positions <= ctx.query_positions[stop - 1])).flatten(0, 1).any(0)
            width = int(seen.nonzero().max()) + 1 if bool(seen.any()) else 1
            probs = group_attention(queries[..., start:stop, :], keys[:, :, :width], ctx.query_positions[start:stop],
                                    key_positions[..., :width], ctx.scaling, ctx.query_valid[:, start:stop],
                                    lse=None if lse is None else lse[..., start:stop])
            totals[..., :width] += probs.sum(2)
            if stop > first_profiled:
                low = max(start, first_profiled)
                kept_blocks.append((low, stop, probs[:, :, low - start:]))
        ctx.add_stat(SCORE_STAT, totals)
        del totals
        cumulative, kinds, rel_keys = ctx.stat(SCORE_STAT), ctx.stat(KIND_STAT), ctx.relative_positions()
        row_start = ctx.row_start.clamp(min=0)
        prompt_len = ctx.tokens_seen + ctx.query_valid.sum(1)
        local_window = torch.ceil(policy.local_ratio * prompt_len.double()).long()
        mass = torch.zeros(B, H, 5, dtype=torch.float64, device=keys.device)
        while kept_blocks:
            low, stop, probs = kept_blocks.pop(0)
            width = probs.shape[-1]
            rel_queries = torch.where(ctx.query_valid[:, low:stop],
                                      ctx.query_positions[low:stop].view(1, -1) - row_start.view(-1, 1), -1)
            add_recovered_mass(mass, probs, rel_queries, kinds[..., :width], rel_keys[..., :width],
                               cumulative[..., :width], local_window, policy.frequent_ratio, self.protected_prefix(),
                               policy.window)
            del probs
        rows = ctx.query_valid[:, first_profiled:].sum(-1).clamp(min=1).view(B, 1, 1)
        recovery = (mass / rows).float()
        last = ctx.query_positions[-1] - row_start
        kept = torch.stack([
            self._keep(torch.full((B, H), c, dtype=torch.long, device=keys.device), kinds, cumulative, rel_keys,
                       last, prompt_len, local_window).sum(-1)
            for c in range(len(CANDIDATES))
        ], dim=-1)
        self.profiles[layer_idx] = LayerProfile(recovery.cpu(), kept.cpu(), local_window, prompt_len,
                                                int(ctx.query_valid[:, first_profiled:].sum(-1).min()))
        self.choices = None
        self.profile_seconds += time.perf_counter() - started

    def _keep(self, choice, kinds, cumulative, positions, last, current_len, local_window) -> torch.Tensor:
        return head_keep_mask(choice, kinds, cumulative, positions, last, current_len, local_window,
                              self.policy.frequent_ratio, self.protected_prefix(), self.policy.window)

    # ------------------------------------------------------------------ choices
    def _resolve(self) -> dict[int, torch.Tensor]:
        """Each profiled layer's choice [B, H], with T fixed or searched for the target ratio."""
        if self.choices is not None:
            return self.choices
        policy = self.policy
        layers = sorted(self.profiles)
        recovery = torch.stack([self.profiles[layer].recovery for layer in layers])  # [N, B, H, 5]
        kept = torch.stack([self.profiles[layer].kept for layer in layers])
        B, H = recovery.shape[1:3]
        thresholds = torch.full((B,), float(policy.recovery))
        if policy.compression_ratio:
            prompt_len = self.profiles[layers[0]].prompt_len.cpu()
            for b in range(B):  # one search per sequence: each has its own profile
                total = float(prompt_len[b]) * len(layers) * H
                per_head = (recovery[:, b].reshape(-1, 5), kept[:, b].reshape(-1, 5).double())
                thresholds[b], _ = search_threshold(*per_head, total, float(policy.compression_ratio))
        choices = choose(recovery, thresholds.view(1, B, 1, 1)).long()
        self.thresholds = thresholds
        self.choices = {layer: choices[i] for i, layer in enumerate(layers)}
        return self.choices

    # ------------------------------------------------------------------ eviction
    def score(self, layer_idx, ctx):
        """1 where the head's own policy keeps the token, 0 where it drops it (all 1 before profiling)."""
        if layer_idx not in self.profiles:
            return torch.ones(ctx.view.positions.shape, device=ctx.view.positions.device)
        choice = self._resolve()[layer_idx].to(ctx.view.positions.device)
        last = (ctx.seen - 1) - ctx.row_start.clamp(min=0)
        keep = self._keep(choice, ctx.stat(KIND_STAT), ctx.stat(SCORE_STAT), ctx.relative_positions(), last,
                          ctx.tokens_seen, self.profiles[layer_idx].local_window)
        return keep.float()

    def select(self, scores, positions, eviction):
        return {layer: (score > 0.5) & (positions[layer] >= 0) for layer, score in scores.items()}

    # ------------------------------------------------------------------ reporting
    def head_choices(self) -> dict[int, torch.Tensor]:
        """Chosen candidate per profiled layer: {layer: LongTensor [B, H]} (index into CANDIDATES)."""
        return {layer: c.clone() for layer, c in self._resolve().items()}

    def head_recovery(self) -> dict[int, torch.Tensor]:
        """Recovery of every candidate on the profiled rows: {layer: [B, H, 5]}."""
        return {layer: p.recovery.clone() for layer, p in self.profiles.items()}

    def candidate_kept(self) -> dict[int, torch.Tensor]:
        """Tokens each candidate keeps at the end of the prompt: {layer: LongTensor [B, H, 5]}."""
        return {layer: p.kept.clone() for layer, p in self.profiles.items()}

    @property
    def threshold(self) -> torch.Tensor:
        """The T used per sequence ([B]): `recovery`, or the one searched for `compression_ratio`."""
        self._resolve()
        return self.thresholds.clone()

    def profile_ratio(self) -> torch.Tensor:
        """Fraction of the prompt's (evictable layer, KV head, token) entries the chosen policies drop: [B]."""
        choices = self._resolve()
        kept = sum(p.kept.gather(-1, choices[layer].unsqueeze(-1)).sum((1, 2)).double()
                   for layer, p in self.profiles.items())
        first = next(iter(self.profiles.values()))
        total = first.prompt_len.cpu().double() * len(self.profiles) * first.kept.shape[1]
        return 1.0 - kept / total


@dataclass(frozen=True)
class FastGenPolicy(Policy):
    """Per-head hybrid policies chosen by profiling the prompt's attention.

    recovery: T, the attention recovery each head's policy must reach on the prompt (the paper: 0.91-0.98).
    local_ratio: r_l, local window as a fraction of the prompt length. frequent_ratio: r_f, heavy hitters as a
    fraction of the current length. sink_tokens: first tokens kept by every policy. profile_window: last prompt
    query rows read (None = all). profile_memory_mb: cap on the attention rows held for profiling (one layer).
    compression_ratio: if > 0, a target ratio; T is searched to reach it.
    tokenizer: to find special/punctuation tokens (kvevict.generate/answer give the cache theirs).
    """

    recovery: float = 0.95
    local_ratio: float = 0.3
    frequent_ratio: float = 0.3
    sink_tokens: int = 4
    profile_window: int | None = None
    profile_memory_mb: float = 512.0
    decode_interval: int | None = 32
    tokenizer: Any = field(default=None, repr=False, compare=False)

    name = "fastgen"
    State = FastGenState
    # T and the tokenizer do not change what is observed (token kinds are stored with the rows)
    SIZING_PARAMS: ClassVar[frozenset[str]] = Policy.SIZING_PARAMS | {"recovery", "tokenizer"}
    OPTIONAL_PARAMS: ClassVar[frozenset[str]] = Policy.OPTIONAL_PARAMS | {"profile_window"}

    def validate(self) -> None:
        super().validate()
        if self.budget is not None:
            raise ValueError("fastgen sizes each head by its recovery, not by a budget: give recovery "
                             "(or compression_ratio as a target), not budget")
        if self.allocation != "uniform" or self.head_floor is not None:
            raise ValueError("fastgen chooses a policy per head; allocation and head_floor do not apply")
        self._check_number("recovery", 0.0, 1.0, high_open=False)
        self._check_number("local_ratio", 0.0, 1.0, low_open=True, high_open=False)
        self._check_number("frequent_ratio", 0.0, 1.0, low_open=True, high_open=False)
        self._check_count("profile_window", minimum=1, unit="query rows")
        self._check_number("profile_memory_mb", 0.0, float("inf"), low_open=True)

    @property
    def evicts(self) -> bool:
        return True

    def describe(self) -> str:
        if self.compression_ratio:
            return f"fastgen(target ratio={self.compression_ratio:g})"
        return f"fastgen(T={self.recovery:g})"
