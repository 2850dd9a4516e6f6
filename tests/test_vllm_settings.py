"""The vLLM plugin's settings and selection, without vLLM: validation, the kept count the scheduler plans, and
the kept positions the worker picks from captured tensors, against an EvictingCache on the same prompt."""

import warnings

import pytest
import torch

from kvevict import EvictingCache, make_policy
from kvevict.compat import cache_kwargs
from kvevict.contexts import Geometry
from kvevict.models import tiny_model
from kvevict.vllm import kept_tokens, parse
from kvevict.vllm.selection import gather_kept, select_kept
from kvevict.vllm.settings import request_settings


def test_parse_validates_like_make_policy():
    assert parse({"policy": "snapkv", "compression_ratio": 0.75}).policy == make_policy("snapkv", compression_ratio=0.75)
    with pytest.raises(ValueError, match="compression_ratio"):
        parse({"policy": "snapkv", "compression_ratio": 1.5})
    with pytest.raises(ValueError, match="no parameter"):
        parse({"policy": "knorm", "ratio": 0.5})
    with pytest.raises(ValueError, match="need a \"policy\""):
        parse({"compression_ratio": 0.5})
    with pytest.raises(ValueError, match="not supported inside vLLM"):
        parse({"policy": "kvzip", "compression_ratio": 0.5})
    with pytest.raises(ValueError, match="allocation must be 'uniform'"):
        parse({"policy": "snapkv", "compression_ratio": 0.5, "allocation": "head"})
    with pytest.raises(ValueError, match="record_kept"):
        parse({"policy": "knorm", "record_kept": "yes"})


def test_request_settings_override_the_server():
    server = parse({"policy": "snapkv", "compression_ratio": 0.75, "observation_window": 32})
    assert request_settings(server, None) is server
    assert request_settings(server, {"other": 1}) is server
    ratio = request_settings(server, {"kvevict": {"compression_ratio": 0.5}}).policy
    assert ratio == make_policy("snapkv", compression_ratio=0.5, observation_window=32)
    other = request_settings(server, {"kvevict": {"policy": "knorm", "compression_ratio": 0.25}}).policy
    assert other == make_policy("knorm", compression_ratio=0.25)


def test_request_settings_as_json_text():
    """The OpenAI API's vllm_xargs take strings and numbers only: the settings come as JSON text there."""
    server = parse({"policy": "snapkv", "compression_ratio": 0.75})
    assert request_settings(server, {"kvevict": '{"compression_ratio": 0.5}'}).policy == make_policy(
        "snapkv", compression_ratio=0.5)
    with pytest.raises(ValueError, match="not valid JSON"):
        request_settings(server, {"kvevict": "{compression_ratio: 0.5"})
    with pytest.raises(ValueError, match="must be a JSON object"):
        request_settings(server, {"kvevict": "0.5"})


@pytest.mark.parametrize("name, params", [("snapkv", {}), ("streamingllm", {}), ("knorm", {}),
                                          ("window", {"window": 8}), ("tova", {})])
@pytest.mark.parametrize("tokens", [1, 5, 63, 64, 100, 257, 2000])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_kept_tokens_is_what_select_keeps(name, params, tokens, ratio):
    policy = make_policy(name, compression_ratio=ratio, **params)
    geometry = Geometry(layer_kinds=("full",), kv_heads=2, group_size=2, head_dim=8, dtype=torch.float32,
                        device=torch.device("cpu"), model_config=None)
    g = torch.Generator().manual_seed(tokens)
    layers = {0: {"keys": torch.randn(tokens, 2, 8, generator=g), "values": torch.randn(tokens, 2, 8, generator=g),
                  "scaling": 8**-0.5, "queries": torch.randn(min(tokens, policy.query_window or 1), 4, 8, generator=g)}}
    layers[0]["query_positions"] = torch.arange(tokens - layers[0]["queries"].shape[0], tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # protected tokens past the target: kvevict warns, and keeps them
        kept = select_kept(policy.start(geometry), layers)
    assert kept[0].shape == (2, kept_tokens(policy, tokens))


def test_gather_kept_is_a_per_head_gather():
    tensor = torch.arange(5 * 2 * 3).view(5, 2, 3)
    kept = torch.tensor([[0, 3], [1, 4]])
    out = gather_kept(tensor, kept)
    assert out.shape == (2, 2, 3)
    assert torch.equal(out[:, 0], tensor[[0, 3], 0]) and torch.equal(out[:, 1], tensor[[1, 4], 1])


@pytest.mark.parametrize("name", ["snapkv", "knorm", "streamingllm", "tova"])
def test_selection_from_captured_tensors_matches_evicting_cache(name):
    """What the worker selects from a prefill's keys and last queries equals what an EvictingCache keeps."""
    model = tiny_model("llama")
    policy = make_policy(name, compression_ratio=0.75, decode_interval=None,
                         **({"window": 16, "observation_window": 16} if name == "snapkv" else {}))
    ids = torch.randint(3, 300, (1, 120), generator=torch.Generator().manual_seed(0))
    cache = EvictingCache(model, policy)
    # the reference: one prefill through the cache, evicted at its end
    state = cache.state
    observed = {}
    original = state.observe

    def observe(layer_idx, ctx):  # what attention saw: keys of the whole prompt, queries with RoPE
        observed[layer_idx] = (ctx.view.keys[0].transpose(0, 1).clone(), ctx.view.values[0].transpose(0, 1).clone(),
                               ctx.queries[0].reshape(-1, ctx.queries.shape[-2], ctx.queries.shape[-1]).clone(),
                               ctx.scaling)
        return original(layer_idx, ctx)

    state.observe = observe
    with torch.no_grad():
        model(input_ids=ids, **cache_kwargs(cache))
    geometry = cache.geometry
    layers = {}
    for layer, (keys, values, queries, scaling) in observed.items():
        window = policy.query_window or 1
        layers[layer] = {"keys": keys, "values": values, "scaling": scaling,
                         "queries": queries.transpose(0, 1)[-window:], "query_positions": torch.arange(120 - window, 120)}
    kept = select_kept(policy.start(geometry), layers)
    for layer in layers:
        reference = cache.kept_positions(layer)[0]
        for head, positions in enumerate(reference):
            assert torch.equal(kept[layer][head], positions.sort().values.long()), (layer, head)
