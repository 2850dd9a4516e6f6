"""Policy parameters: token counts are whole numbers (numpy integers accepted, bools refused), fractions are finite
numbers in their range, each refused with one message naming the parameter; bad policy names list the names."""

import numpy as np
import pytest

import kvevict
from kvevict.policies import list_policies

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("policy, params, name", [
    # token counts of every policy
    ("snapkv", {"decode_interval": 2.5}, "decode_interval"),
    ("snapkv", {"decode_interval": True}, "decode_interval"),
    ("snapkv", {"prefill_chunk": 3.5}, "prefill_chunk"),
    ("snapkv", {"prefill_chunk": "64"}, "prefill_chunk"),
    ("streamingllm", {"sink_tokens": None}, "sink_tokens"),
    ("streamingllm", {"sink_tokens": 2.0}, "sink_tokens"),
    ("window", {"window": NAN}, "window"),
    ("window", {"window": None}, "window"),
    ("window", {"window": 1.5}, "window"),
    ("knorm", {"budget": True}, "budget"),
    ("knorm", {"budget": 16.0}, "budget"),
    ("knorm", {"budget": np.float64(16)}, "budget"),
    # fractions of every policy
    ("snapkv", {"compression_ratio": NAN}, "compression_ratio"),
    ("snapkv", {"compression_ratio": True}, "compression_ratio"),
    ("snapkv", {"compression_ratio": "0.5"}, "compression_ratio"),
    ("snapkv", {"allocation": "head", "head_floor": NAN}, "head_floor"),
    ("snapkv", {"allocation": "head", "head_floor": INF}, "head_floor"),
    # each policy's own parameters
    ("snapkv", {"observation_window": 8.0}, "observation_window"),
    ("snapkv", {"kernel_size": 5.0}, "kernel_size"),
    ("snapkv", {"kernel_size": True}, "kernel_size"),
    ("h2o", {"recent_fraction": NAN}, "recent_fraction"),
    ("h2o", {"recent_fraction": "half"}, "recent_fraction"),
    ("ahakv", {"pool_kernel": True}, "pool_kernel"),
    ("ahakv", {"recent_rows": np.float32(8)}, "recent_rows"),
    ("kvzip", {"chunk_size": 100.0}, "chunk_size"),
    ("kvzip", {"prompt_overlap": None}, "prompt_overlap"),
    ("kvzip", {"score_precision": "bf16"}, "score_precision"),
    ("fastgen", {"recovery": NAN}, "recovery"),
    ("fastgen", {"local_ratio": NAN}, "local_ratio"),
    ("fastgen", {"frequent_ratio": INF}, "frequent_ratio"),
    ("fastgen", {"profile_window": 4.5}, "profile_window"),
    ("fastgen", {"profile_memory_mb": INF}, "profile_memory_mb"),
    ("fastgen", {"profile_memory_mb": NAN}, "profile_memory_mb"),
    ("fastkvzip", {"window": 2.5}, "window"),
    ("fastkvzip", {"compression_ratio": NAN}, "compression_ratio"),
    ("fastkvzip", {"sink_tokens": None}, "sink_tokens"),
    ("attention-gate", {"tau": NAN}, "tau"),
    ("attention-gate", {"sink_tokens": 2.0}, "sink_tokens"),
    ("attention-gate", {"decode_interval": 0.5}, "decode_interval"),
])
def test_bad_value_is_refused_naming_the_parameter(policy, params, name):
    with pytest.raises(ValueError, match=rf"^{name} must be "):
        kvevict.make_policy(policy, **params)


def test_numpy_numbers_are_accepted_as_plain_numbers():
    policy = kvevict.make_policy("snapkv", budget=np.int64(16), window=np.int32(4), sink_tokens=np.int64(2),
                                 prefill_chunk=np.int64(64), decode_interval=np.uint8(8), kernel_size=np.int64(3))
    values = [policy.budget, policy.window, policy.sink_tokens, policy.prefill_chunk, policy.decode_interval,
              policy.kernel_size]
    assert values == [16, 4, 2, 64, 8, 3] and all(type(v) is int for v in values)
    policy = kvevict.make_policy("h2o", compression_ratio=np.float64(0.5), recent_fraction=np.float32(0.25))
    assert (policy.compression_ratio, policy.recent_fraction) == (0.5, 0.25)
    assert type(policy.compression_ratio) is float and type(policy.recent_fraction) is float


def test_message_says_what_is_accepted():
    with pytest.raises(ValueError, match=r"budget must be a whole number of tokens >= 1 or None, got True"):
        kvevict.make_policy("knorm", budget=True)
    with pytest.raises(ValueError, match=r"compression_ratio must be in \[0, 1\), got nan"):
        kvevict.make_policy("knorm", compression_ratio=NAN)
    with pytest.raises(ValueError, match=r"local_ratio must be in \(0, 1\], got nan"):
        kvevict.make_policy("fastgen", local_ratio=NAN)


def test_none_where_a_policy_decides_later():
    policy = kvevict.make_policy("fastkvzip", budget=64)  # window None: worked out from the context
    assert policy.window is None and policy.budget == 64
    assert kvevict.make_policy("fastgen", profile_window=None).profile_window is None
    assert kvevict.make_policy("attention-gate", tau=None, sink_tokens=None).tau is None


@pytest.mark.parametrize("name", [None, 3, ["snapkv"]])
def test_policy_name_that_is_not_a_string_lists_the_names(name):
    with pytest.raises(ValueError, match="policy name must be a string, one of .*snapkv"):
        kvevict.make_policy(name)


@pytest.mark.parametrize("name", ["fastkvzip", "attention-gate"])
def test_unbound_gate_policy_describes_itself(name):
    text = kvevict.make_policy(name).describe()
    assert isinstance(text, str) and text.startswith(name)


@pytest.mark.parametrize("name", list_policies())
def test_every_policy_with_defaults_validates_and_describes_itself(name):
    assert kvevict.make_policy(name).describe().startswith(name)
