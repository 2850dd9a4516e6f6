"""Gate checkpoints: both kinds (Fast KVzip sink gates, Attention-Gate) load through one loader that refuses every
damaged checkpoint (missing or extra tensors, wrong shapes, NaN weights, bad JSON, a truncated file, a ratio out of
range) with one clear error naming the folder, and still loads the intact and shipped ones."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import kvevict
from kvevict.gates import attention_gate, sink_gate
from kvevict.gates.checkpoint import SHIPPED, save_gates
from kvevict.models import tiny_model


def fastkvzip_checkpoint(folder, model):
    layers = sink_gate.gated_layers(model)
    hyper = {**sink_gate.gate_hyper(model, 8, 4), "target_ratio": 0.6}
    gates = sink_gate.build_gates(hyper, layers)
    return save_gates(folder, "fastkvzip", model, {i: gates[str(i)] for i in layers}, hyper)


def attention_gate_checkpoint(folder, model):
    config = attention_gate.GateConfig(window=8, target_ratio=0.6)
    return attention_gate.save_attention_gates(folder, model, attention_gate.build_gates(model, config), config)


KINDS = {
    "fastkvzip": (fastkvzip_checkpoint, sink_gate.load_gates),
    "attention-gate": (attention_gate_checkpoint, attention_gate.load_attention_gates),
}


def edit_tensors(folder, change) -> None:
    tensors = load_file(str(folder / "gates.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "gates.safetensors"))


def edit_meta(folder, change) -> None:
    meta = json.loads((folder / "gates.json").read_text())
    change(meta)
    (folder / "gates.json").write_text(json.dumps(meta))  # json writes NaN as NaN, as a hand edit could


def layer_one_tensor(tensors) -> str:
    return sorted(k for k in tensors if k.startswith("1."))[0]


def drop_tensor(tensors):
    del tensors[layer_one_tensor(tensors)]


def put(value):
    def change(tensors):
        tensors[layer_one_tensor(tensors)].view(-1)[0] = value
    return change


def reshape(tensors):
    key = layer_one_tensor(tensors)
    tensors[key] = torch.zeros(*tensors[key].shape[:-1], tensors[key].shape[-1] + 1)


def add_stray_tensor(tensors):
    tensors["7.extra"] = torch.zeros(2)


def truncate(folder):
    data = (folder / "gates.safetensors").read_bytes()
    (folder / "gates.safetensors").write_bytes(data[: len(data) // 2])


DAMAGES = {
    "missing tensor": (lambda f: edit_tensors(f, drop_tensor), "lacks layer 1's"),
    "NaN weight": (lambda f: edit_tensors(f, put(float("nan"))), "NaN or infinite"),
    "infinite weight": (lambda f: edit_tensors(f, put(float("inf"))), "NaN or infinite"),
    "wrong shape": (lambda f: edit_tensors(f, reshape), "has shape"),
    "stray tensor": (lambda f: edit_tensors(f, add_stray_tensor), "tensors of no gate listed in gates.json: 7.extra"),
    "truncated weights": (truncate, "gates.safetensors is damaged"),
    "bad JSON": (lambda f: (f / "gates.json").write_text("{not json"), "gates.json is not valid JSON"),
    "JSON list": (lambda f: (f / "gates.json").write_text("[]"), "must hold a JSON object"),
    "no hyper": (lambda f: edit_meta(f, lambda m: m.pop("hyper")), "lacks the 'hyper' object"),
    "no layers": (lambda f: edit_meta(f, lambda m: m.pop("layers")), "'layers' must be a list"),
    "extra layer": (lambda f: edit_meta(f, lambda m: m["layers"].append(3)), r"this model needs \[0, 1, 2\]"),
    "missing layer": (lambda f: edit_meta(f, lambda m: m["layers"].remove(2)), r"this model needs \[0, 1, 2\]"),
    "ratio 1.5": (lambda f: edit_meta(f, lambda m: m["hyper"].update(target_ratio=1.5)), r"must be in \[0, 1\)"),
    "ratio NaN": (lambda f: edit_meta(f, lambda m: m["hyper"].update(target_ratio=float("nan"))), "got nan"),
    "ratio text": (lambda f: edit_meta(f, lambda m: m["hyper"].update(target_ratio="0.5")), "target_ratio"),
    "bad hyper": (lambda f: edit_meta(f, lambda m: m["hyper"].update(window=0, gate_dim=0)), "bad hyper-parameters"),
}


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("kind", KINDS)
def test_damaged_checkpoint_is_refused_naming_the_folder(kind, damage, tmp_path):
    make, load = KINDS[kind]
    spoil, message = DAMAGES[damage]
    model = tiny_model("llama")
    folder = make(tmp_path / "gates", model)
    load(folder, model)  # intact: loads
    spoil(folder)
    with pytest.raises(ValueError, match=message) as err:
        load(folder, model)
    assert str(folder) in str(err.value)


@pytest.mark.parametrize("kind", KINDS)
def test_missing_file_is_a_file_not_found_error(kind, tmp_path):
    make, load = KINDS[kind]
    model = tiny_model("llama")
    folder = make(tmp_path / "gates", model)
    (folder / "gates.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(folder))):
        load(folder, model)


@pytest.mark.parametrize("kind", KINDS)
def test_intact_checkpoint_loads_every_weight(kind, tmp_path):
    make, load = KINDS[kind]
    model = tiny_model("llama")
    folder = make(tmp_path / "gates", model)
    saved = load_file(str(folder / "gates.safetensors"))
    gates = load(folder, model)[1]
    loaded = {f"{i}.{name}": t for i, gate in gates.items() for name, t in gate.state_dict().items()}
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


@pytest.mark.parametrize("kind", KINDS)
def test_policy_refuses_a_ratio_out_of_range(kind, tmp_path):
    make, _ = KINDS[kind]
    model = tiny_model("llama")
    folder = make(tmp_path / "gates", model)
    kvevict.EvictingCache(model, kvevict.make_policy(kind, gates=str(folder)))  # intact, and read once
    edit_meta(folder, lambda m: m["hyper"].update(target_ratio=1.5))
    with pytest.raises(ValueError, match=rf"{re.escape(str(folder))}.*target_ratio .*got 1.5"):
        kvevict.EvictingCache(model, kvevict.make_policy(kind, gates=str(folder)))


def test_fastkvzip_checkpoint_without_a_ratio_needs_one_given(tmp_path):
    model = tiny_model("llama")
    folder = fastkvzip_checkpoint(tmp_path / "gates", model)
    edit_meta(folder, lambda m: m["hyper"].pop("target_ratio"))
    with pytest.raises(ValueError, match="records no target_ratio"):
        kvevict.EvictingCache(model, kvevict.make_policy("fastkvzip", gates=str(folder)))
    policy = kvevict.make_policy("fastkvzip", gates=str(folder), compression_ratio=0.5)
    assert kvevict.EvictingCache(model, policy).state.compression_ratio == 0.5


def test_shipped_checkpoints_pass_the_checks():
    """Random models shaped like the shipped gates' models (no download): every shipped checkpoint loads."""
    smollm2 = tiny_model("llama", hidden_size=576, num_hidden_layers=30, num_key_value_heads=3,
                         num_attention_heads=9, head_dim=64, intermediate_size=8)
    gemma3 = tiny_model("gemma3", hidden_size=640, num_hidden_layers=18, num_key_value_heads=1, num_attention_heads=4,
                        head_dim=64, intermediate_size=8,
                        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3)
    assert len(sink_gate.load_gates(SHIPPED / "fastkvzip" / "smollm2-135m", smollm2)[1]) == 30
    assert len(attention_gate.load_attention_gates(SHIPPED / "attention-gate" / "smollm2-135m", smollm2)[1]) == 30
    assert sorted(sink_gate.load_gates(SHIPPED / "fastkvzip" / "gemma3-270m", gemma3)[1]) == ["11", "17", "5"]
    assert sorted(attention_gate.load_attention_gates(SHIPPED / "attention-gate" / "gemma3-270m", gemma3)[1]) == [
        "11", "17", "5"]
    qwen = tiny_model("qwen2", hidden_size=896, num_hidden_layers=24, num_key_value_heads=2, num_attention_heads=14,
                      head_dim=64, intermediate_size=8)
    assert len(sink_gate.load_gates(SHIPPED / "fastkvzip" / "qwen2.5-coder-0.5b", qwen)[1]) == 24
