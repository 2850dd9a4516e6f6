"""Each fast kernel against the dense computation it replaces (same inputs, fp32)."""

import pytest
import torch

import kvevict.policies.kvzip as kvzip
from kvevict.attention import allowed_keys


def kvzip_scores_dense(queries, keys, key_positions, query_positions, scale, protected, chunk, repeat_start):
    """Reference: the full [T, L] logits of the repeat queries, masked to the scoring subset, softmax, max."""
    start, stop = chunk
    kpos = key_positions.long()
    in_chunk = (kpos >= start) & (kpos < stop)
    subset = (kpos >= 0) & ((kpos < protected) | in_chunk | (kpos >= repeat_start))
    logits = torch.einsum("bhgtd,bhld->bhgtl", queries.float(), keys.float()) * scale
    visible = allowed_keys(query_positions, key_positions) & subset.unsqueeze(2)
    probs = logits.masked_fill(~visible.unsqueeze(2), float("-inf")).softmax(-1)
    return torch.where(in_chunk, probs.amax(dim=(2, 3)), 0.0)


def replay_layout(B, H, context, repeat, holes=()):
    """Key positions of a view after a repeat pass: the context (some slots evicted per head), then the repeat."""
    L = context + repeat
    kpos = torch.arange(L).view(1, 1, L).repeat(B, H, 1).int()
    for b, h, slot in holes:  # an evicted token: its head's later rows move up one slot, leaving a free slot
        row = torch.cat([kpos[b, h, :slot], kpos[b, h, slot + 1:], torch.tensor([-1], dtype=torch.int32)])
        kpos[b, h] = row
    return kpos


@pytest.mark.parametrize("holes", [(), ((0, 1, 5), (0, 1, 9), (0, 0, 30))])
@pytest.mark.parametrize("fused", [True, False])
def test_kvzip_repeat_scores_match_dense(holes, fused, monkeypatch):
    monkeypatch.setattr(kvzip, "FUSED_CPU", fused and kvzip.FUSED_CPU)
    torch.manual_seed(0)
    B, H, G, d, context, repeat = 1, 2, 3, 16, 40, 23
    kpos = replay_layout(B, H, context, repeat, holes)
    L = kpos.shape[-1]
    keys = torch.randn(B, H, L, d)
    queries = torch.randn(B, H, G, repeat, d)
    qpos = torch.arange(context, context + repeat)
    if holes:  # the newest rows of a shortened head sit one slot earlier; its last slot is free
        keys[kpos < 0] = 0.0
    got = kvzip.repeat_scores(queries, keys, kpos, qpos, 0.25, 4, (12, 31), context)
    want = kvzip_scores_dense(queries, keys, kpos, qpos, 0.25, 4, (12, 31), context)
    in_chunk = (kpos >= 12) & (kpos < 31)
    assert in_chunk.any()
    assert torch.allclose(got[in_chunk], want[in_chunk], atol=1e-6, rtol=1e-5)


def test_kvzip_repeat_scores_with_a_missing_repeat_row():
    """A layout a replay never leaves (a repeat token absent from one head) still scores like the dense map."""
    torch.manual_seed(1)
    B, H, G, d, context, repeat = 1, 2, 2, 8, 20, 9
    kpos = replay_layout(B, H, context, repeat, ((0, 0, 25),))  # head 0 lacks repeat position 25
    keys, queries = torch.randn(B, H, kpos.shape[-1], d), torch.randn(B, H, G, repeat, d)
    qpos = torch.arange(context, context + repeat)
    got = kvzip.repeat_scores(queries, keys, kpos, qpos, 0.3, 2, (2, 20), context)
    want = kvzip_scores_dense(queries, keys, kpos, qpos, 0.3, 2, (2, 20), context)
    in_chunk = (kpos >= 2) & (kpos < 20)
    assert torch.allclose(got[in_chunk], want[in_chunk], atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(not kvzip.FUSED_CPU, reason="the model-precision scores run on the fused CPU kernels")
@pytest.mark.parametrize("block_elements", [2**24, 2**9])  # one block of rows, and many
def test_kvzip_scores_in_model_precision(block_elements, monkeypatch):
    """16-bit queries and keys: each score is the float32 probability at the row a 16-bit product picked, so it is
    never above the float32 max and below it by at most that product's rounding (twice half a 16-bit ulp of the
    log-probability); most keys get the max itself. Both up to the fused 16-bit kernels' log-sum-exps, which are
    within ~6e-5 of float32's (`lse_error`). In float32 precision the same inputs give the float32 max."""
    monkeypatch.setattr(kvzip, "_BLOCK_ELEMENTS", block_elements)
    torch.manual_seed(2)
    B, H, G, d, context, repeat = 1, 2, 3, 16, 120, 60
    kpos = replay_layout(B, H, context, repeat)
    keys = (2 * torch.randn(B, H, kpos.shape[-1], d)).bfloat16()
    queries = (2 * torch.randn(B, H, G, repeat, d)).bfloat16()
    qpos = torch.arange(context, context + repeat)
    args = (queries, keys, kpos, qpos, 0.25, 4, (10, 100), context)
    want = kvzip_scores_dense(*args)  # float32 from the same 16-bit values
    in_chunk = (kpos >= 10) & (kpos < 100)
    exact = kvzip.repeat_scores(*args, model_precision=False)
    assert torch.allclose(exact[in_chunk], want[in_chunk], atol=1e-6, rtol=1e-5)
    got = kvzip.repeat_scores(*args, model_precision=True)
    log_want, log_got = want[in_chunk].log(), got[in_chunk].log()
    gap, lse_error = log_want - log_got, 1e-4
    assert bool((gap >= -lse_error).all())
    assert bool((gap <= 2**-8 * log_want.abs() + lse_error).all())
    assert (gap.abs() < lse_error).float().mean() > 0.9


def store_with_uneven_heads(B, H, d, lengths, seed=0):
    """A LayerStore whose segments keep the given numbers of tokens (per batch row and head), in position order."""
    from kvevict.storage import LayerStore

    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    store = LayerStore(B, H, d, torch.float32, torch.device("cpu"))
    store.append(torch.randn(B, H, n, d, generator=g), torch.randn(B, H, n, d, generator=g), torch.arange(n),
                 torch.ones(B, n, dtype=torch.bool), slack=0)
    view = store.view()
    keep = torch.zeros(B, H, n, dtype=torch.bool)
    for s, length in enumerate(lengths):  # each head keeps a different, scattered subset
        b, h = divmod(s, H)
        keep[b, h, torch.randperm(n, generator=g)[:length]] = True
    store.compact(keep, view, slack=3)
    return store, n


@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("lengths", [[7, 12, 3, 20, 9, 1], [7, 7, 7, 7, 12, 12]])  # the second: runs of equal segments
def test_segment_attention_matches_masked_attention(T, lengths):
    from kvevict.attention import _equal_runs, evicted_attention, segment_attention, segments_apply

    torch.manual_seed(3)
    B, H, G, d = 2, 3, 2, 8
    store, n = store_with_uneven_heads(B, H, d, lengths)
    if lengths[0] == lengths[3]:  # equal lengths and room: equal distances, read as strided batches
        assert [count for _, count, _ in _equal_runs(store.host_start, store.host_len)] == [4, 2]
    g = torch.Generator().manual_seed(4)
    qpos = torch.arange(n, n + T)
    store.append(torch.randn(B, H, T, d, generator=g), torch.randn(B, H, T, d, generator=g), qpos,
                 torch.ones(B, T, dtype=torch.bool), slack=0)
    assert store.uniform_cap is None  # the padded view of this store is a gather
    queries = torch.randn(B, H * G, T, d, generator=g)
    assert segments_apply(store, qpos, T)
    got = segment_attention(queries, store.keys, store.values, store.host_start, store.host_len, 0.35)
    view = store.view()
    want = evicted_attention(queries, view.keys, view.values, qpos, view.positions, 0.35,
                             heads_aligned=False, no_empty_slots=False)
    assert torch.allclose(got, want, atol=1e-5)


def test_segment_attention_hides_what_a_gate_hid_but_never_the_query_itself():
    from kvevict.attention import evicted_attention, segment_attention, segments_apply

    B, H, G, d = 2, 3, 2, 8
    store, n = store_with_uneven_heads(B, H, d, [7, 12, 3, 20, 9, 1])
    g = torch.Generator().manual_seed(5)
    qpos = torch.tensor([n])
    store.append(torch.randn(B, H, 1, d, generator=g), torch.randn(B, H, 1, d, generator=g), qpos,
                 torch.ones(B, 1, dtype=torch.bool), slack=0)
    view = store.view()
    visible = torch.rand(view.positions.shape, generator=g) < 0.5
    visible[..., 0] = False  # every head hides its oldest key, the 1-token head its own query's key too
    queries = torch.randn(B, H * G, 1, d, generator=g)
    rows_visible = torch.zeros(store.keys.shape[0], dtype=torch.bool)  # the mask per storage row
    rows_visible[view.row_index[view.valid]] = visible[view.valid]
    assert segments_apply(store, qpos, 1)
    got = segment_attention(queries, store.keys, store.values, store.host_start, store.host_len, 0.35,
                            rows_visible)
    want = evicted_attention(queries, view.keys, view.values, qpos, view.positions, 0.35, visible=visible,
                             heads_aligned=False, no_empty_slots=False)
    assert torch.allclose(got, want, atol=1e-5)
    unmasked = segment_attention(queries, store.keys, store.values, store.host_start, store.host_len, 0.35)
    assert not torch.allclose(got, unmasked, atol=1e-3)  # the mask mattered


def test_segments_do_not_apply_to_padding_or_empty_heads():
    from kvevict.attention import segments_apply

    store, n = store_with_uneven_heads(1, 2, 4, [0, 5])
    assert not segments_apply(store, torch.tensor([n]), 1)  # an empty head: the masked path handles it
    store, n = store_with_uneven_heads(1, 2, 4, [4, 5])
    assert segments_apply(store, torch.tensor([n]), 1)
    assert not segments_apply(store, torch.tensor([n, n + 1]), 2)  # these queries were not appended


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_decode_attention_matches_sdpa_gqa(dtype):
    """evicted_attention's decode rewrite (a new token's G query heads as G rows of their KV head) against the SDPA
    enable_gqa call it replaces, on a strided view like the store's."""
    import torch.nn.functional as F

    from kvevict.attention import evicted_attention

    g = torch.Generator().manual_seed(0)
    B, H, G, L, d = 2, 3, 3, 40, 16
    store = torch.randn(B * H * (L + 8), d, generator=g).to(dtype)
    keys = store.view(B * H, L + 8, d)[:, :L].reshape(B, H, L, d)  # room past the end, as after a decode append
    values = (store.view(B * H, L + 8, d)[:, :L] * 0.5 + 1).reshape(B, H, L, d)
    positions = torch.arange(L).expand(B, H, L)
    query = torch.randn(B, H * G, 1, d, generator=g).to(dtype)
    out = evicted_attention(query, keys, values, torch.tensor([L - 1]), positions, 0.25, no_empty_slots=True)
    reference = F.scaled_dot_product_attention(query, keys, values, scale=0.25, enable_gqa=True).transpose(1, 2)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    assert out.shape == reference.shape and (out.float() - reference.float()).abs().max() <= tolerance
