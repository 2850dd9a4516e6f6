"""The attention kernels' shortcuts agree with dense references."""

import pytest
import torch

import kvevict.attention as attn


def dense_attention(q, k, v, qpos, kpos, scale):
    """Reference: [B, Hq, T, d] queries over [B, H, L, d] keys with per-head positions [B, H, L] (-1 empty)."""
    G = q.shape[1] // k.shape[1]
    k, v, kpos = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), kpos.repeat_interleave(G, 1)
    logits = q @ k.transpose(-1, -2) * scale
    ok = (kpos[:, :, None, :] >= 0) & (kpos[:, :, None, :] <= qpos.view(1, 1, -1, 1))
    return (logits.masked_fill(~ok, float("-inf")).softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("case", ["decode_full", "decode_holes", "fresh_causal", "chunk_per_head"])
def test_evicted_attention_paths_match_dense(case):
    torch.manual_seed(0)
    B, H, G, d = 2, 2, 3, 8
    T = 1 if case.startswith("decode") else 6
    L = 10 if case != "fresh_causal" else T
    q, k, v = torch.randn(B, H * G, T, d), torch.randn(B, H, L, d), torch.randn(B, H, L, d)
    qpos = torch.arange(L - T, L)
    kpos = torch.arange(L).view(1, 1, L).expand(B, H, L).clone().int()
    if case == "decode_holes":
        kpos[0, 1, 2:5] = -1  # empty slots of a padded view
    if case == "chunk_per_head":
        kpos[1, 0, 1] = -1
    aligned = bool((kpos == kpos[:, :1]).all())
    got = attn.evicted_attention(q, k, v, qpos, kpos, 0.3, heads_aligned=aligned,
                                 no_empty_slots=bool((kpos >= 0).all()))
    assert torch.allclose(got, dense_attention(q, k, v, qpos, kpos, 0.3), atol=1e-5)


@pytest.mark.parametrize("past", [0, 7])
def test_fused_column_sums_match_eager(past, monkeypatch):
    torch.manual_seed(1)
    B, H, G, T, d = 2, 3, 2, 12, 16
    q, k = torch.randn(B, H, G, T, d), torch.randn(B, H, past + T, d)
    qpos = torch.arange(past, past + T)
    kpos = torch.arange(past + T).view(1, 1, -1).expand(B, H, -1).int()
    weight = torch.ones(B, T)
    weight[1, :3] = 0
    fused = attn._column_sums_flash(q, k, qpos, kpos, 0.25, weight, None, None)
    assert fused is not None
    monkeypatch.setattr(attn, "_column_sums_flash", lambda *args: None)
    eager = attn.accumulated_attention(q, k, qpos, kpos, 0.25, weight)
    assert torch.allclose(fused, eager, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_fresh_prefill_hands_its_lse_to_the_column_sums(dtype):
    """The prefill kernel that reports log-sum-exps gives SDPA's output, and column sums from its lse equal the
    two-pass ones (bit for bit in float32: the same kernel computes the same lse)."""
    torch.manual_seed(3)
    B, H, G, T, d = 1, 3, 3, 40, 16
    q, k, v = torch.randn(B, H * G, T, d, dtype=dtype), torch.randn(B, H, T, d, dtype=dtype), torch.randn(B, H, T, d, dtype=dtype)
    pos = torch.arange(T)
    kpos = pos.view(1, 1, T).expand(B, H, T).int()
    lse = []
    got = attn.evicted_attention(q, k, v, pos, kpos, 0.25, heads_aligned=True, no_empty_slots=True, lse_out=lse)
    plain = attn.evicted_attention(q, k, v, pos, kpos, 0.25, heads_aligned=True, no_empty_slots=True)
    assert torch.equal(got, plain)
    assert len(lse) == 1 and lse[0].shape == (B, H * G, T)
    weight = torch.ones(B, T)
    queries = q.view(B, H, G, T, d)
    handed = attn.accumulated_attention(queries, k, pos, kpos, 0.25, weight, lse=lse[0])
    two_pass = attn.accumulated_attention(queries, k, pos, kpos, 0.25, weight)
    if dtype == torch.float32:
        assert torch.equal(handed, two_pass)
    else:  # the bfloat16 kernel's own lse: float32 sums of exact bf16 products, in another order
        assert torch.allclose(handed, two_pass, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("T", [1, 4])
def test_hidden_keys_are_not_attended_but_a_query_sees_itself(T):
    torch.manual_seed(2)
    B, H, G, d, L = 1, 2, 2, 8, 9
    q, k, v = torch.randn(B, H * G, T, d), torch.randn(B, H, L, d), torch.randn(B, H, L, d)
    qpos = torch.arange(L - T, L)
    kpos = torch.arange(L).view(1, 1, L).expand(B, H, L).clone().int()
    visible = torch.rand(B, H, L) > 0.5
    visible[..., -1] = False  # the newest key is hidden, yet its own query still sees it
    got = attn.evicted_attention(q, k, v, qpos, kpos, 0.3, visible=visible, heads_aligned=True, no_empty_slots=True)
    own = kpos.unsqueeze(2) == qpos.view(1, 1, -1, 1)
    seen = visible.unsqueeze(2) | own  # [B, H, T, L]
    G_seen = seen.repeat_interleave(G, 1)
    kk, vv = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    causal = kpos.repeat_interleave(G, 1).unsqueeze(2) <= qpos.view(1, 1, -1, 1)
    logits = (q @ kk.transpose(-1, -2) * 0.3).masked_fill(~(G_seen & causal), float("-inf"))
    want = (logits.softmax(-1) @ vv).transpose(1, 2)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_fresh_prefill_with_hidden_keys_matches_the_masked_attention(dtype, monkeypatch):
    """The fused path of a gate's prefill (hidden keys as a broadcast bias, a hidden own key merged back) against the
    masked attention it replaces, the first key hidden too (its query sees only itself)."""
    torch.manual_seed(4)
    B, H, G, T, d = 2, 2, 3, 37, 16
    q = torch.randn(B, H * G, T, d, dtype=dtype)
    k, v = torch.randn(B, H, T, d, dtype=dtype), torch.randn(B, H, T, d, dtype=dtype)
    pos = torch.arange(T)
    kpos = pos.view(1, 1, T).expand(B, H, T).int()
    visible = torch.rand(B, H, T) > 0.5
    visible[0, 1, 0] = False
    called = []
    original = attn.flagged_prefill
    monkeypatch.setattr(attn, "flagged_prefill", lambda *a: called.append(1) or original(*a))
    got = attn.evicted_attention(q, k, v, pos, kpos, 0.25, visible=visible, heads_aligned=True, no_empty_slots=True)
    assert called
    monkeypatch.setattr(attn, "FUSED_CPU", False)  # the masked attention the fused path replaces
    want = attn.evicted_attention(q, k, v, pos, kpos, 0.25, visible=visible, heads_aligned=True, no_empty_slots=True)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got.float(), want.float(), atol=tolerance)
