"""Gate checkpoints: safetensors weights + a JSON with the model's identity and the gate's hyper-parameters.

    <dir>/gates.safetensors   tensors named "<layer>.<parameter>"
    <dir>/gates.json          {"kind", "model": model_identity(model), "hyper": {...}, "training": {...}}

Never pickle. Loading checks that the checkpoint was made for the model it is applied to, and that it is whole:
every gate complete, in its shapes, finite, and a target ratio in [0, 1).
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


def read_gates(directory: str | Path, kind: str, model, build) -> tuple[dict, torch.nn.ModuleDict]:
    """(meta, gates) of a checkpoint, after checking its kind, that it fits `model`, and every tensor.

    `build(meta)` makes fresh gates for the model ({str(layer): module}); each layer of gates.json must be one of
    them, and its tensors must be exactly that module's parameters, in their shapes, and finite. Every damaged case
    is a ValueError naming `directory` (a missing file: FileNotFoundError).
    """
    directory = Path(directory)
    meta_path, weights = directory / "gates.json", directory / "gates.safetensors"
    if not meta_path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"no gate checkpoint in {directory} (expected gates.json and gates.safetensors)")
    meta = _read_meta(directory, meta_path)
    if meta.get("kind") != kind:
        raise ValueError(f"{directory} holds {meta.get('kind')!r} gates, not {kind!r} gates")
    mine, theirs = model_identity(model), meta["model"]
    mismatched = [k for k in IDENTITY_KEYS if mine.get(k) != theirs.get(k)]
    if mismatched:
        detail = ", ".join(f"{k}: checkpoint {theirs.get(k)!r} vs model {mine.get(k)!r}" for k in mismatched)
        raise ValueError(f"gate checkpoint {directory} was made for another model ({theirs.get('name')!r}): {detail}")
    try:
        gates = build(meta)
    except (ValueError, TypeError, KeyError, RuntimeError) as err:
        raise ValueError(f"gate checkpoint {directory}: bad hyper-parameters in gates.json: {err}") from None
    needed = sorted(int(i) for i in gates)
    if sorted(meta["layers"]) != needed:
        raise ValueError(f"gate checkpoint {directory} gates layers {sorted(meta['layers'])}; "
                         f"this model needs {needed}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        flat = load_file(str(weights))
    except SafetensorError as err:
        raise ValueError(f"gate checkpoint {directory}: gates.safetensors is damaged ({err})") from None
    for idx in needed:
        gate = gates[str(idx)]
        expected = gate.state_dict()
        state = {name: flat.pop(f"{idx}.{name}", None) for name in expected}
        missing = [name for name, tensor in state.items() if tensor is None]
        if missing:
            raise ValueError(f"gate checkpoint {directory}: gates.safetensors lacks layer {idx}'s "
                             f"{', '.join(missing)}")
        for name, tensor in state.items():
            if tensor.shape != expected[name].shape:
                raise ValueError(f"gate checkpoint {directory}: {idx}.{name} has shape {tuple(tensor.shape)}, "
                                 f"the gate needs {tuple(expected[name].shape)}")
            if not torch.isfinite(tensor).all():
                raise ValueError(f"gate checkpoint {directory}: {idx}.{name} holds NaN or infinite weights")
        gate.load_state_dict(state)
    if flat:
        raise ValueError(f"gate checkpoint {directory}: gates.safetensors holds tensors of no gate listed in "
                         f"gates.json: {', '.join(sorted(flat)[:5])}")
    return meta, gates


def _read_meta(directory: Path, path: Path) -> dict:
    """gates.json, checked for the fields every loader reads (ValueError naming `directory` otherwise)."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"gate checkpoint {directory}: gates.json is not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"gate checkpoint {directory}: gates.json must hold a JSON object")
    for key in ("model", "hyper"):
        if not isinstance(meta.get(key), dict):
            raise ValueError(f"gate checkpoint {directory}: gates.json lacks the {key!r} object")
    layers = meta.get("layers")
    if not isinstance(layers, list) or not all(type(i) is int for i in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"gate checkpoint {directory}: gates.json 'layers' must be a list of distinct layer "
                         f"indices, got {layers!r}")
    ratio = meta["hyper"].get("target_ratio")
    # JSON lets NaN and Infinity through; the ratio is the fraction of KV pairs the gates evict
    if ratio is not None and (type(ratio) not in (int, float) or not 0.0 <= ratio < 1.0):
        raise ValueError(f"gate checkpoint {directory}: target_ratio in gates.json must be in [0, 1), got {ratio!r}")
    return meta


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


_LOADED: dict[tuple, object] = {}
_LOADED_MAX = 8


def load_once(kind: str, folder: str | Path, model, load) -> object:
    """`load(folder, model)` (a gate kind's loader), run once per process for each checkpoint and model shape:
    every cache and request of a policy shares the loaded gates. A checkpoint whose files change is read again."""
    folder = Path(folder).resolve()
    files = [folder / "gates.safetensors", folder / "gates.json"]
    stamps = tuple((f.stat().st_mtime_ns, f.stat().st_size) if f.is_file() else None for f in files)
    identity = tuple(sorted((k, str(v)) for k, v in model_identity(model).items() if k != "name"))
    key = (kind, str(folder), stamps, identity)
    if key not in _LOADED:
        if len(_LOADED) >= _LOADED_MAX:
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[key] = load(folder, model)
    return _LOADED[key]
