"""Gate checkpoints: safetensors weights + a JSON with the model's identity and the gate's hyper-parameters.

    <dir>/gates.safetensors   tensors named "<layer>.<parameter>"
    <dir>/gates.json          {"kind", "model": model_identity(model), "hyper": {...}, "training": {...}}

Never pickle. Loading checks that the checkpoint was made for the model it is applied to.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..models import model_identity

SHIPPED = Path(__file__).parent / "checkpoints"
# Identity fields that must match for a gate to be valid on a model (the name is informative only: the same
# weights loaded from a GGUF, a directory or a hub id carry different names).
IDENTITY_KEYS = ("model_type", "num_hidden_layers", "num_key_value_heads", "num_attention_heads", "hidden_size")


def save_gates(directory: str | Path, kind: str, model, layers: dict[int, torch.nn.Module], hyper: dict,
               training: dict | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write the gates of `layers` ({layer index: module}) for `model` into `directory`, weights in `dtype`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    tensors = {f"{idx}.{name}": p.detach().to(dtype).contiguous().cpu()
               for idx, module in layers.items() for name, p in module.state_dict().items()}
    save_file(tensors, str(directory / "gates.safetensors"))
    meta = {"kind": kind, "model": model_identity(model), "layers": sorted(layers), "hyper": hyper,
            "training": training or {}}
    (directory / "gates.json").write_text(json.dumps(meta, indent=2))
    return directory


def read_gates(directory: str | Path, kind: str, model) -> tuple[dict, dict[int, dict[str, torch.Tensor]]]:
    """(meta, {layer: state_dict}) of a checkpoint, after checking its kind and that it fits `model`."""
    directory = Path(directory)
    meta_path, weights = directory / "gates.json", directory / "gates.safetensors"
    if not meta_path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"no gate checkpoint in {directory} (expected gates.json and gates.safetensors)")
    meta = json.loads(meta_path.read_text())
    if meta.get("kind") != kind:
        raise ValueError(f"{directory} holds {meta.get('kind')!r} gates, not {kind!r} gates")
    mine, theirs = model_identity(model), meta.get("model", {})
    mismatched = [k for k in IDENTITY_KEYS if mine.get(k) != theirs.get(k)]
    if mismatched:
        detail = ", ".join(f"{k}: checkpoint {theirs.get(k)!r} vs model {mine.get(k)!r}" for k in mismatched)
        raise ValueError(f"gate checkpoint {directory} was made for another model ({theirs.get('name')!r}): {detail}")
    from safetensors.torch import load_file

    flat = load_file(str(weights))
    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        idx, name = key.split(".", 1)
        per_layer.setdefault(int(idx), {})[name] = tensor
    return meta, per_layer


def shipped_gates(kind: str, model_name: str) -> Path:
    """Folder of the gates shipped inside the package for `model_name` (clear error when there are none)."""
    folder = SHIPPED / kind / model_name
    if not (folder / "gates.json").is_file():
        available = sorted(p.name for p in (SHIPPED / kind).glob("*") if (p / "gates.json").is_file())
        raise FileNotFoundError(
            f"no {kind} gates are shipped for {model_name!r} (shipped: {', '.join(available) or 'none'}); "
            f"train some with `kvevict train {kind} --model {model_name} --out DIR` and pass gates=DIR"
        )
    return folder
