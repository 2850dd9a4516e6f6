"""Attention over an evicted cache: the torch reference path, registered with transformers as "kvevict".

Each KV head may keep a different set of tokens, so causality cannot come from a square mask: it comes from
the original positions the cache stores next to every kept row (key position <= query position). The mask
also drops empty slots of the padded per-layer view, keys outside a sliding window, and keys a gate hid.

When the model runs with any other cache (or none), the function falls back to transformers' SDPA path with
the mask transformers built, so setting the implementation on a model is harmless.
"""

from __future__ import annotations

import contextvars

import torch
import torch.nn.functional as F

ATTN_IMPLEMENTATION = "kvevict"
# The cache whose forward is running (set by the decoder hooks, hooks.py): the attention function reads it.
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("kvevict_active_cache", default=None)


def active_cache():
    """The EvictingCache whose forward pass is running, if any."""
    return _ACTIVE.get()


def activate(cache) -> contextvars.Token:
    return _ACTIVE.set(cache)


def deactivate(token: contextvars.Token) -> None:
    _ACTIVE.reset(token)


FUSED_CPU = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
_QUERY_BLOCK = 256  # query rows per block when materialising probabilities (bounds memory on long prompts)


def allowed_keys(
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Which keys each query may see: [B, H, T, L] bool from query positions [T] and key positions [B, H, L]."""
    q = query_positions.view(1, 1, -1, 1).to(key_positions.dtype)
    k = key_positions.unsqueeze(2)
    allowed = (k >= 0) & (k <= q)
    if sliding_window is not None:
        allowed &= k > q - sliding_window
    return allowed


def attention_probs(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    visible: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q.k * scale) under the causal/position mask, fp32: [B, H, G, T, L].

    queries [B, H, G, T, d] (G query heads per KV head), keys [B, H, L, d], positions as in `allowed_keys`.
    """
    allowed = allowed_keys(query_positions, key_positions, sliding_window)
    if visible is not None:
        allowed = allowed & (visible.unsqueeze(2) | (key_positions.unsqueeze(2) == query_positions.view(1, 1, -1, 1)))
    logits = torch.einsum("bhgtd,bhld->bhgtl", queries.float(), keys.float()) * scale
    logits = logits.masked_fill(~allowed.unsqueeze(2), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)  # queries with no visible key (padding) contribute nothing


def accumulated_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    scale: float,
    query_weight: torch.Tensor,
    sliding_window: int | None = None,
    visible: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over queries (weighted by query_weight [B, T]) and the G heads of a group of the attention: [B, H, L].

    Computed in blocks of query rows so a long prompt never materialises its full attention map. `lse` ([B, H*G, T],
    optional): the rows' log-sum-exps if the attention computed them already (`LayerContext.attention_lse`).
    """
    B, H, G, T, _ = queries.shape
    fast = _column_sums_flash(queries, keys, query_positions, key_positions, scale, query_weight, sliding_window, visible,
                              lse)
    if fast is not None:
        return fast
    total = keys.new_zeros(B, H, keys.shape[2], dtype=torch.float32)
    for start in range(0, T, _QUERY_BLOCK):
        stop = min(T, start + _QUERY_BLOCK)
        probs = attention_probs(
            queries[..., start:stop, :], keys, query_positions[start:stop], key_positions, scale, sliding_window, visible
        )
        total += torch.einsum("bhgtl,bt->bhl", probs, query_weight[:, start:stop].float())
    return total


def _flash_lse(q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    """log-sum-exp of scale * q.k per query row, [B, N, T], from the fused CPU kernel (no T x L map is stored)."""
    _, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, k, 0.0, causal, scale=scale)
    return lse


def _column_sums_flash(queries, keys, query_positions, key_positions, scale, query_weight, sliding_window, visible,
                       lse=None):
    """Column sums of the attention map without materialising it, or None where this shortcut does not apply.

    sum_t w_t softmax_t(j) = sum_t exp(s * q_t.k_j - lse_t + log w_t): first the row log-sum-exps lse_t, then a
    second fused pass where the keys act as queries over the queries, the per-row bias riding in one extra
    dimension (q' = [s * q, log w - lse], k' = [k, 1]); its log-sum-exp is the log of each column sum. Applies on
    CPU to the common layout: every head keeps the same keys, the older ones all visible to every new query, the
    newest being the queries themselves (a fresh prefill or a later chunk), no sliding window, no hidden keys.
    A fresh prefill's attention may hand over its lse (`lse`): then only the second pass runs.
    """
    if queries.device.type != "cpu" or sliding_window is not None or visible is not None:
        return None
    if not hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return None
    B, H, G, T, d = queries.shape
    L = keys.shape[2]
    past = L - T
    kpos = key_positions[:, :1]
    if past < 0 or not bool((key_positions == kpos).all()):
        return None
    if not bool((kpos[..., past:] == query_positions).all()) or (past and not bool((kpos[..., :past] >= 0).all())):
        return None
    if past and int(kpos[..., :past].max()) >= int(query_positions.min()):
        return None
    q = queries.float().reshape(B, H * G, T, d)
    k = keys.float().repeat_interleave(G, dim=1)  # [B, H*G, L, d]
    if lse is None or past:
        lse = _flash_lse(q, k[:, :, past:], True, scale)
        if past:
            lse = torch.logaddexp(lse, _flash_lse(q, k[:, :, :past], False, scale))
    else:
        lse = lse.float()
    bias = torch.log(query_weight.float().clamp(min=1e-30)).view(B, 1, T) - lse  # padding queries weigh nothing
    q_aug = torch.cat([q * scale, bias.unsqueeze(-1)], dim=-1)  # [B, HG, T, d+1]
    k_aug = torch.cat([k, torch.ones_like(k[..., :1])], dim=-1)  # [B, HG, L, d+1]
    # newest keys: key j collects from queries t >= j (anti-causal), i.e. causal once both are reversed
    new_cols = _flash_lse(k_aug[:, :, past:].flip(2), q_aug.flip(2), True, 1.0).flip(-1)
    cols = new_cols if not past else torch.cat([_flash_lse(k_aug[:, :, :past], q_aug, False, 1.0), new_cols], dim=-1)
    return cols.exp().view(B, H, G, L).sum(2)


def evicted_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    scaling: float,
    sliding_window: int | None = None,
    visible: torch.Tensor | None = None,
    softcap: float | None = None,
    heads_aligned: bool | None = None,
    no_empty_slots: bool = False,
    lse_out: list | None = None,
) -> torch.Tensor:
    """Exact attention over kept entries. queries [B, Hq, T, d]; keys/values [B, H, L, d] -> [B, T, Hq, d].

    `heads_aligned` (all KV heads of a row keep the same positions) and `no_empty_slots` (every slot of the view
    holds a token) are layout facts the storage knows; they select cheaper but equivalent kernels. `lse_out`: a
    list that receives the rows' log-sum-exps [B, Hq, T] when the kernel used produces them (a fresh prefill on CPU).
    """
    B, Hq, T, d = queries.shape
    H, L = keys.shape[1], keys.shape[2]
    G = Hq // H
    plain = softcap is None and visible is None and sliding_window is None
    if softcap is None and sliding_window is None and T == 1:
        # one new query: every stored key is in its past; only empty slots (and hidden keys) need masking
        if no_empty_slots and visible is None and L > 0:
            # the G query heads of a KV head as G query rows: no mask is needed for one new token, and SDPA's
            # enable_gqa path is ~6x slower in bfloat16 on CPU (a [B, H, L] view decoding 5 rows of 2k tokens)
            out = F.scaled_dot_product_attention(queries.reshape(B, H, G, d), keys, values, scale=scaling)
            return out.reshape(B, Hq, 1, d).transpose(1, 2)
        hidden = key_positions < 0
        if visible is not None:
            hidden = hidden | ~(visible | (key_positions == query_positions.view(1, 1, 1).to(key_positions.dtype)))
        hidden &= ~hidden.all(-1, keepdim=True)  # a padding query with nothing to see: keep it finite
        logits = torch.matmul(queries.reshape(B, H, G, d), keys.transpose(-1, -2)) * scaling  # [B, H, G, L]
        logits = logits.masked_fill(hidden.unsqueeze(2), float("-inf"))
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(values.dtype)
        return torch.matmul(probs, values).reshape(B, Hq, 1, d).transpose(1, 2)
    if (visible is not None and softcap is None and sliding_window is None and L == T and no_empty_slots
            and FUSED_CPU and queries.device.type == "cpu" and bool((key_positions == query_positions).all())):
        return flagged_prefill(queries, keys, values, visible, scaling)
    if heads_aligned is None:
        heads_aligned = bool((key_positions == key_positions[:, :1]).all())
    shared = heads_aligned and visible is None  # one mask serves every head
    kpos = key_positions[:, :1] if shared else key_positions
    if shared and plain and L == T and bool((kpos == query_positions).all()):
        # a fresh prefill without padding: plain causal attention, for which SDPA skips the masked half
        if lse_out is not None and FUSED_CPU and queries.device.type == "cpu":
            # the same fused kernel SDPA runs here (its GQA path repeats K/V too), asked for its log-sum-exps
            if G > 1:
                keys, values = keys.repeat_interleave(G, dim=1), values.repeat_interleave(G, dim=1)
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(queries, keys, values, 0.0, True,
                                                                                  scale=scaling)
            lse_out.append(lse)
            return out.transpose(1, 2)
        out = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, scale=scaling, enable_gqa=G > 1)
        return out.transpose(1, 2)
    allowed = allowed_keys(query_positions, kpos, sliding_window)
    if visible is not None:
        allowed &= visible.unsqueeze(2) | (kpos.unsqueeze(2) == query_positions.view(1, 1, -1, 1))
    allowed |= ~allowed.any(-1, keepdim=True)  # padding queries with nothing to see: keep them finite
    # Group query heads with their KV head: [B, H, G*T, d] against [B, H, L, d], no repeat of K/V needed.
    q = queries.reshape(B, H, G * T, d) if G > 1 else queries
    mask = allowed.unsqueeze(2).expand(-1, -1, G, -1, -1).reshape(B, allowed.shape[1], G * T, L) if G > 1 else allowed
    if softcap is None:
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling)
    else:
        logits = torch.matmul(q, keys.transpose(-1, -2)) * scaling
        logits = torch.tanh(logits / softcap) * softcap
        logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
        out = torch.matmul(torch.softmax(logits, dim=-1, dtype=torch.float32).to(values.dtype), values)
    return out.reshape(B, Hq, T, d).transpose(1, 2)


def flagged_prefill(queries, keys, values, visible, scaling, with_lse: bool = False):
    """A fresh prefill (no padding, every head holding the new tokens) whose keys a gate hid in-context: [B, T, Hq, d],
    and with `with_lse` each row's log-sum-exp [B, Hq, T] too.

    Query i sees key j <= i when key j is visible, and always itself. The first part is one fused causal pass with
    the hidden keys as an additive mask broadcast over the queries ([B, Hq, 1, L], not a [T, L] map per head); a
    query whose own key is hidden then gets that key merged in by log-sum-exp. Same result as the masked attention
    up to float rounding (test_attention.py)."""
    B, Hq, T, d = queries.shape
    G = Hq // keys.shape[1]
    if G > 1:
        keys, values, visible = (x.repeat_interleave(G, dim=1) for x in (keys, values, visible))
    hidden_bias = torch.zeros(visible.shape, dtype=queries.dtype, device=queries.device)
    hidden_bias.masked_fill_(~visible, float("-inf"))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        queries, keys, values, 0.0, True, attn_mask=hidden_bias.unsqueeze(2), scale=scaling)
    own_logit = (queries.float() * keys.float()).sum(-1) * scaling  # [B, Hq, T]
    # a query with no visible key up to itself (hidden first tokens): the kernel gives it 0 and lse 0; its own key
    # must take all the mass
    lse = lse.masked_fill(visible.cumsum(-1) == 0, float("-inf"))
    with_own = _merge((out, lse), (values, own_logit))
    out = torch.where(visible.unsqueeze(-1), out, with_own).transpose(1, 2)
    if not with_lse:
        return out
    return out, torch.where(visible, lse, torch.logaddexp(lse, own_logit))


def _merge(first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Softmax attention over the union of two disjoint key sets from each set's (output, log-sum-exp): the
    second set's share of the probability mass is sigmoid(lse_2 - lse_1)."""
    (out_1, lse_1), (out_2, lse_2) = first, second
    share = torch.sigmoid(lse_2 - lse_1).unsqueeze(-1)
    return torch.lerp(out_1.float(), out_2.float(), share).to(out_1.dtype)


def segment_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    seg_start: list[int],
    seg_len: list[int],
    scaling: float,
    visible_rows: torch.Tensor | None = None,
    new_lse_out: list | None = None,
) -> torch.Tensor:
    """Attention read straight from a store's segments, no padded copy: queries [B, Hq, T, d] -> [B, T, Hq, d].

    keys/values [rows, d] hold segment s = b * H + h at rows seg_start[s] .. + seg_len[s] (host ints, all > 0).
    Layout it assumes (the caller checks it): every stored row is visible to every query, except that the newest
    T rows of each segment are the queries' own tokens, in order (causal among themselves). With T = 1 that is
    any decode step. For T > 1 the older rows and the new ones are two fused passes merged by their log-sum-exps.
    `visible_rows` ([rows] bool, T = 1 only): keys hidden in-context (a gate's flags); the query's own token, the
    newest row of its segment, stays visible. `new_lse_out` (T > 1): a list that receives the log-sum-exp of each
    query row over the new tokens alone (causal), [B, H, G, T] fp32, a by-product of the first pass.
    """
    B, Hq, T, d = queries.shape
    if visible_rows is not None and T != 1:
        raise ValueError("segment_attention takes visible_rows for one query per segment only")
    S = len(seg_start)
    H = S // B
    G = Hq // H
    if keys.stride() != (d, 1) or values.stride() != (d, 1):
        raise ValueError("segment_attention reads row-contiguous [rows, d] buffers")
    # Consecutive segments of one length placed at a constant distance (the heads of a row, rows stacked from
    # equal caches) are read as one strided batch: one call per run instead of one per segment
    groups = queries.reshape(S, G, T, d)
    if visible_rows is not None:  # each query sees its own token, the newest row of its segment
        visible_rows = visible_rows.clone()
        visible_rows[torch.tensor([a + n - 1 for a, n in zip(seg_start, seg_len)], device=keys.device)] = True
    outs, new_lses = [], []
    for first, count, stride in _equal_runs(seg_start, seg_len):
        start, length = seg_start[first], seg_len[first]
        size, strides = (count, 1, length, d), (stride * d, d, d, 1)
        k = keys.as_strided(size, strides, keys.storage_offset() + start * d)
        v = values.as_strided(size, strides, values.storage_offset() + start * d)
        q = groups[first:first + count]  # [n, G, T, d]
        if T == 1:  # a decode step
            mask = None if visible_rows is None else visible_rows.as_strided(
                (count, 1, 1, length), (stride, 1, 1, 1), visible_rows.storage_offset() + start)
            if count == 1:  # one segment: its G query heads as heads, so that the kernel can use two threads
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=G > 1)
                outs.append(out.reshape(1, 1, G, d))
            else:  # each segment's G query heads side by side as query rows
                outs.append(F.scaled_dot_product_attention(q.view(count, 1, G, d), k, v, attn_mask=mask,
                                                           scale=scaling))
            continue
        past = length - T
        k_new, v_new = k[:, :, past:].expand(count, G, T, d), v[:, :, past:].expand(count, G, T, d)
        new = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k_new, v_new, 0.0, True, scale=scaling)
        new_lses.append(new[1])
        if past == 0:
            outs.append(new[0])
            continue
        older = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.reshape(count, 1, G * T, d), k[:, :, :past], v[:, :, :past], 0.0, False, scale=scaling)
        outs.append(_merge((new[0], new[1]), (older[0].view(count, G, T, d), older[1].view(count, G, T))))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    if new_lse_out is not None and new_lses:
        new_lse_out.append((new_lses[0] if len(new_lses) == 1 else torch.cat(new_lses)).view(B, H, G, T))
    return out.view(B, 1, Hq, d) if T == 1 else out.view(B, Hq, T, d).transpose(1, 2)


def _equal_runs(seg_start: list[int], seg_len: list[int]) -> list[tuple[int, int, int]]:
    """(first segment, count, row distance) of each maximal run of consecutive segments with the same length and
    a constant distance between their starts."""
    runs, S, s = [], len(seg_start), 0
    while s < S:
        end, stride = s + 1, 0
        if end < S and seg_len[end] == seg_len[s] and seg_start[end] > seg_start[s]:
            stride = seg_start[end] - seg_start[s]
            while end < S and seg_len[end] == seg_len[s] and seg_start[end] - seg_start[end - 1] == stride:
                end += 1
        runs.append((s, end - s, stride))
        s = end
    return runs


def segments_apply(store, query_positions: torch.Tensor, T: int) -> bool:
    """Whether `segment_attention` computes exactly what the masked attention would over `store`'s view: every
    segment non-empty; with T > 1 (CPU only), the newest T rows of every segment are the queries, older rows
    precede them. Costs a look at the positions only when T > 1 (prefill chunks, KVzip's repeat passes)."""
    if min(store.host_len, default=0) < T or T == 0:
        return False
    if T == 1:
        return True
    if not FUSED_CPU or store.keys.device.type != "cpu":
        return False
    rows = torch.tensor([start + length - T for start, length in zip(store.host_start, store.host_len)],
                        device=store.positions.device)
    newest = store.positions[rows.view(-1, 1) + torch.arange(T, device=rows.device)]  # [S, T]
    if not bool((newest == query_positions.to(newest.dtype)).all()):
        return False
    older = torch.tensor([n - T for n in store.host_len])
    first = torch.tensor(store.host_start)
    last_older = store.positions[(first + older - 1).clamp(min=0)][older > 0]  # rows are in position order
    return not bool((last_older >= int(query_positions[0])).any())


def kvevict_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers AttentionInterface entry point."""
    cache = active_cache()
    if cache is None or not cache.manages(module):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    return cache.attend(module, query, key, value, scaling, kwargs.get("softcap")), None


_registered = False


def register() -> None:
    """Register "kvevict" with transformers' attention and mask interfaces (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, kvevict_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    _registered = True
