"""The cache reaches kvevict however the caller hands it over, on every supported transformers release."""

import tokenize
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

import kvevict
from kvevict.compat import CACHE_ARG, CACHE_NAMES, cache_kwargs
from kvevict.models import tiny_model, tiny_tokenizer

from .conftest import left_padded_batch

# transformers 5.24 takes the cache as `cache=` and keeps `past_key_values=` as an alias; older releases take only
# `past_key_values=` (and would pass an unknown `cache=` down the model unused)
ACCEPTED_NAMES = CACHE_NAMES if CACHE_ARG == "cache" else ("past_key_values",)
PACKAGE = Path(kvevict.__file__).parent


def reference_logits(ids, mask):
    model = tiny_model("llama")
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **cache_kwargs(DynamicCache(config=model.config))).logits


@pytest.mark.parametrize("name", ACCEPTED_NAMES)
def test_keyword_under_either_name_evicts(name):
    model = tiny_model("llama")
    ids, mask = left_padded_batch((40, 33))
    cache = kvevict.EvictingCache(model, kvevict.make_policy("snapkv", compression_ratio=0.5, window=4))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **{name: cache})
    assert cache.seen == 40
    assert cache.kept_counts()[:, 0].eq(20).all() and cache.kept_counts()[:, 1].eq(17).all()


@pytest.mark.parametrize("name", ACCEPTED_NAMES)
def test_full_cache_under_either_name_matches_dynamic_cache(name):
    model = tiny_model("llama")
    ids, mask = left_padded_batch((24, 19), seed=1)
    cache = kvevict.EvictingCache(model, kvevict.make_policy("full"))
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, **{name: cache}).logits
    assert cache.seen == 24
    valid = mask.bool()
    assert torch.allclose(got[valid], reference_logits(ids, mask)[valid], atol=1e-4)


def test_positional_cache_on_the_decoder():
    model = tiny_model("llama")
    ids, mask = left_padded_batch((16, 12), seed=2)
    cache = kvevict.EvictingCache(model, kvevict.make_policy("window", budget=8))
    decoder = model.get_decoder()
    with torch.no_grad():
        decoder(ids, mask, None, cache)  # input_ids, attention_mask, position_ids, the cache
    assert cache.seen == 16
    assert cache.kept_counts().eq(8).all()
    assert cache.kept_positions(0)[1][0].tolist() == list(range(4, 12))  # row 1: 12 real tokens, the last 8 kept


@pytest.mark.parametrize("name", ACCEPTED_NAMES)
def test_generate_under_either_name_equals_the_high_level_api(name):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    prompts = ["the quick brown fox jumps over the lazy dog " * 3, "a b c d e f"]
    enc = tok(prompts, return_tensors="pt", padding=True)
    policy = dict(compression_ratio=0.5, window=2)
    cache = kvevict.EvictingCache(model, kvevict.make_policy("h2o", **policy))
    with torch.no_grad():
        out = model.generate(**enc, **{name: cache}, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert cache.seen == enc.input_ids.shape[1] + 5  # the last generated token is never fed back
    texts = tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    assert texts == kvevict.generate(model, tok, prompts, policy=kvevict.make_policy("h2o", **policy),
                                     max_new_tokens=6, chat_template=False)


def code_names(path: Path) -> list[tuple[int, str]]:
    """(line, name) of every identifier in a module's code, strings and comments left out."""
    with path.open("rb") as source:
        return [(t.start[0], t.string) for t in tokenize.tokenize(source.readline) if t.type == tokenize.NAME]


def test_only_the_compat_module_knows_the_cache_argument_name():
    """A module that names the old argument, or compares versions, would branch on releases."""
    offenders = [
        f"{path.relative_to(PACKAGE)}:{line} {name}"
        for path in sorted(PACKAGE.rglob("*.py")) if path.name != "compat.py"
        for line, name in code_names(path) if name in ("past_key_values", "packaging", "parse_version")
    ]
    assert offenders == []
