"""The vLLM plugin's settings and selection, without vLLM: validation, the kept count the scheduler plans, and
the kept positions the worker picks from what a prefill shows it, against an EvictingCache on the same prompt."""

import json
import warnings

import pytest
import torch

from kvevict import EvictingCache, make_policy
from kvevict.compat import cache_kwargs
from kvevict.contexts import Geometry
from kvevict.gates.checkpoint import save_gates
from kvevict.gates.sink_gate import build_gates, gate_hyper, gated_layers
from kvevict.models import tiny_model
from kvevict.vllm import kept_tokens, parse
from kvevict.vllm.selection import Prefill, gather_kept
from kvevict.vllm.settings import check_runnable, geometry, request_settings


def tiny_gates(model, folder, target=0.6):
    """Fast KVzip gates with random weights for `model`, saved in `folder` (trained ratio `target`)."""
    torch.manual_seed(1)
    layers = gated_layers(model)
    hyper = {**gate_hyper(model, 8, 4), "target_ratio": target}
    gates = build_gates(hyper, layers)
    for gate in gates.values():
        for parameter in gate.parameters():  # away from the initial values, so that scores differ per token
            parameter.data.normal_()
    return str(save_gates(folder, "fastkvzip", model, {i: gates[str(i)] for i in layers}, hyper))


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
    for name in ("h2o", "ahakv"):
        assert parse({"policy": name, "compression_ratio": 0.5}).policy == make_policy(name, compression_ratio=0.5)
    # fastkvzip thresholds globally by default: inside vLLM it must be asked for uniform allocation
    with pytest.raises(ValueError, match="allocation must be 'uniform'.*'global'"):
        parse({"policy": "fastkvzip", "compression_ratio": 0.5})
    assert parse({"policy": "fastkvzip", "allocation": "uniform"}).policy.allocation == "uniform"


def test_gates_are_a_server_setting():
    """A request may not point the server at a folder of its choosing."""
    server = parse({"policy": "fastkvzip", "allocation": "uniform", "gates": "/srv/gates"})
    assert request_settings(server, {"kvevict": {"compression_ratio": 0.5}}).policy.gates == "/srv/gates"
    with pytest.raises(ValueError, match="gates can be set in the server's kvevict settings only"):
        request_settings(server, {"kvevict": {"gates": "/tmp/mine"}})


def test_layer_input_policies_need_an_eager_model_and_their_gates(tmp_path):
    model = tiny_model("llama")
    shape = Geometry.of(model)
    policy = make_policy("fastkvzip", allocation="uniform", gates=tiny_gates(model, tmp_path / "gates"))
    check_runnable(policy, shape, layer_inputs=True)
    with pytest.raises(ValueError, match="--enforce-eager"):
        check_runnable(policy, shape, layer_inputs=False)
    check_runnable(make_policy("h2o"), shape, layer_inputs=False)  # reads attention only
    # no gates shipped for this model's name: a ValueError (HTTP 400 at admission), not FileNotFoundError
    with pytest.raises(ValueError, match="no fastkvzip gates are shipped"):
        check_runnable(make_policy("fastkvzip", allocation="uniform"), shape, layer_inputs=True)


def test_geometry_names_an_embedded_model_folder_as_load_model_does(tmp_path):
    """vLLM serves `kvevict model-path NAME`, a folder holding kvevict.json: its gates are found by NAME."""
    config = tiny_model("llama").config
    folder = tmp_path / "smollm2-135m"
    folder.mkdir()
    config.name_or_path = str(folder)
    assert geometry(config, torch.float32).model_config.name_or_path == str(folder)  # not a kvevict folder
    (folder / "kvevict.json").write_text(json.dumps({"name": "smollm2-135m"}))
    named = geometry(config, torch.float32).model_config
    assert named.name_or_path == "smollm2-135m" and config.name_or_path == str(folder)
    assert named.num_key_value_heads == config.num_key_value_heads


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


def one_chunk_selection(state, tokens: int, seed: int, hidden_size: int | None = None) -> dict:
    """What a Prefill keeps from random keys, values, queries (and hidden states) of one chunk, one layer."""
    g = torch.Generator().manual_seed(seed)
    prefill = Prefill(state, tokens)
    if prefill.wants_layer_input:
        prefill.layer_input(0, torch.randn(tokens, hidden_size, generator=g), 0)
    prefill.append(0, torch.randn(tokens, 2, 8, generator=g), torch.randn(tokens, 2, 8, generator=g), 0)
    prefill.observe(0, torch.randn(tokens, 4, 8, generator=g), 0, 8**-0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # protected tokens past the target: kvevict warns, and keeps them
        return prefill.select()


@pytest.mark.parametrize("name, params", [("snapkv", {}), ("streamingllm", {}), ("knorm", {}),
                                          ("window", {"window": 8}), ("tova", {}), ("h2o", {}), ("ahakv", {}),
                                          ("ahakv", {"recent_accumulation": False})])
@pytest.mark.parametrize("tokens", [1, 5, 63, 64, 100, 257, 2000])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_kept_tokens_is_what_select_keeps(name, params, tokens, ratio):
    policy = make_policy(name, compression_ratio=ratio, **params)
    geometry = Geometry(layer_kinds=("full",), kv_heads=2, group_size=2, head_dim=8, dtype=torch.float32,
                        device=torch.device("cpu"), model_config=None)
    kept = one_chunk_selection(policy.start(geometry), tokens, seed=tokens)
    assert kept[0].shape == (2, kept_tokens(policy, tokens))


@pytest.mark.parametrize("ratio", [None, 0.0, 0.5, 0.9])  # None: the ratio the gates were trained for (0.6)
def test_kept_tokens_is_what_select_keeps_with_gates(tmp_path, ratio):
    model = tiny_model("llama", num_key_value_heads=2, num_attention_heads=4, head_dim=8)
    shape = Geometry.of(model)
    policy = make_policy("fastkvzip", compression_ratio=ratio, allocation="uniform",
                         gates=tiny_gates(model, tmp_path / "gates"))
    for tokens in (1, 5, 63, 257, 2000):
        kept = one_chunk_selection(policy.start(shape), tokens, seed=tokens, hidden_size=model.config.hidden_size)
        assert kept[0].shape == (2, kept_tokens(policy, tokens, shape))
    assert kept_tokens(policy, 2000, shape) == {None: 800, 0.0: 2000, 0.5: 1000, 0.9: 200}[ratio]


def test_gather_kept_is_a_per_head_gather():
    tensor = torch.arange(5 * 2 * 3).view(5, 2, 3)
    kept = torch.tensor([[0, 3], [1, 4]])
    out = gather_kept(tensor, kept)
    assert out.shape == (2, 2, 3)
    assert torch.equal(out[:, 0], tensor[[0, 3], 0]) and torch.equal(out[:, 1], tensor[[1, 4], 1])


SELECTION_CASES = [("snapkv", {"window": 16, "observation_window": 16}), ("knorm", {}), ("streamingllm", {}),
                   ("tova", {}), ("h2o", {}), ("ahakv", {"recent_rows": 8}),
                   ("ahakv", {"recent_rows": 8, "recent_accumulation": False, "step_gain": False}),
                   ("fastkvzip", {"allocation": "uniform"})]


@pytest.mark.parametrize("chunk", [None, 37])
@pytest.mark.parametrize("name, params", SELECTION_CASES)
def test_selection_from_a_prefill_matches_evicting_cache(tmp_path, name, params, chunk):
    """What the worker selects from a prefill's keys, values, queries and layer inputs, shown chunk by chunk as
    vLLM runs it (chunk=None: one chunk), equals what an EvictingCache keeps after the same prompt in one forward:
    the same scores, the same kept positions."""
    model = tiny_model("llama")
    if name == "fastkvzip":
        params = {**params, "gates": tiny_gates(model, tmp_path / "gates")}
    policy = make_policy(name, compression_ratio=0.75, decode_interval=None, **params)
    tokens = 120
    ids = torch.randint(3, 300, (1, tokens), generator=torch.Generator().manual_seed(0))
    cache = EvictingCache(model, policy)
    seen = record_forward(cache)
    with torch.no_grad():
        model(input_ids=ids, **cache_kwargs(cache))
    prefill = Prefill(policy.start(cache.geometry), tokens)
    for start in range(0, tokens, chunk or tokens):  # every layer sees a chunk before the next chunk runs
        stop = min(tokens, start + (chunk or tokens))
        for layer, (keys, values, queries, scaling) in seen["attention"].items():
            if prefill.wants_layer_input:
                prefill.layer_input(layer, seen["hidden"][layer][start:stop], start)
            prefill.append(layer, keys[start:stop], values[start:stop], start)
            prefill.observe(layer, queries[start:stop], start, scaling)
    scores = prefill.scores()
    for layer, reference in seen["scores"].items():
        torch.testing.assert_close(scores[layer], reference, rtol=1e-5, atol=1e-6)
    kept = prefill.select()
    for layer in seen["attention"]:
        for head, positions in enumerate(cache.kept_positions(layer)[0]):
            assert torch.equal(kept[layer][head], positions.sort().values.long()), (layer, head)


def test_ahakv_step_gain_without_recent_accumulation_follows_each_chunk():
    """AhaKV without RA sums every query's attention at the Step Gain scale of n tokens seen once the query's
    forward is done and k = ceil((1 - ratio) n) kept: in one chunk n is the prompt's length, as in an
    EvictingCache's one forward; in chunks, each chunk's own end. Sized by a ratio, n / k is 1 / (1 - ratio) but
    for the rounding of k, so chunks ending where (1 - ratio) n is whole (60 and 120 at 0.75) give the scores of
    one forward."""
    model = tiny_model("llama")
    policy = make_policy("ahakv", compression_ratio=0.75, recent_rows=8, recent_accumulation=False,
                         decode_interval=None)
    ids = torch.randint(3, 300, (1, 120), generator=torch.Generator().manual_seed(0))
    cache = EvictingCache(model, policy)
    seen = record_forward(cache)
    with torch.no_grad():
        model(input_ids=ids, **cache_kwargs(cache))
    for chunk in (120, 60):
        prefill = Prefill(policy.start(cache.geometry), 120)
        for start in range(0, 120, chunk):
            for layer, (keys, values, queries, scaling) in seen["attention"].items():
                prefill.append(layer, keys[start:start + chunk], values[start:start + chunk], start)
                prefill.observe(layer, queries[start:start + chunk], start, scaling)
        scores = prefill.scores()
        for layer, reference in seen["scores"].items():
            torch.testing.assert_close(scores[layer], reference, rtol=1e-5, atol=1e-6)


def record_forward(cache: EvictingCache) -> dict:
    """Record what the cache's policy state is shown in one forward of the whole prompt: per layer the keys,
    values and queries attention saw ([tokens, heads, head_dim]) with the softmax scale, the hidden states
    entering attention, and the scores at the eviction that follows."""
    state = cache.state
    seen = {"attention": {}, "hidden": {}, "scores": {}}
    observe, layer_input, score = state.observe, state.on_layer_input, state.score

    def record_observe(layer, ctx):  # keys of the whole prompt, queries with RoPE
        keys, values = ctx.view.keys[0].transpose(0, 1), ctx.view.values[0].transpose(0, 1)
        queries = ctx.queries[0].flatten(0, 1).transpose(0, 1)  # [H, G, T, d] -> [T, H * G, d]
        seen["attention"][layer] = (keys.clone(), values.clone(), queries.clone(), ctx.scaling)
        return observe(layer, ctx)

    def record_layer_input(layer, hidden_states, forward):
        seen["hidden"][layer] = hidden_states[0].clone()
        return layer_input(layer, hidden_states, forward)

    def record_score(layer, ctx):
        seen["scores"][layer] = score(layer, ctx)
        return seen["scores"][layer]

    state.observe, state.on_layer_input, state.score = record_observe, record_layer_input, record_score
    return seen
