"""LoRA adapter files: save, load (peft's folder or the course project's .pth), export.

See `utils.training.lora` for what an adapter folder holds and how plain peft reads it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from tsr.io import read_state_dict
from tsr.model import TSR
from utils.training.lora import candidate_linears, lora_layers, lora_state_dict

ADAPTER_WEIGHTS = "adapter_model.safetensors"


ADAPTER_CONFIG = "adapter_config.json"


TSR_METADATA = "tsr_adapter.json"


PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before module names


COURSE_ALPHA = 16.0  # the course project's .pth has no alpha; its scripts always used 16


class _StateView:
    """Lets TSR.weights_fingerprint hash a state dict whose names were restored."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self._state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def base_fingerprint(model: TSR) -> str:
    """`model.weights_fingerprint()` of the base weights, with peft's `.base_layer` renaming
    undone, so an adapted model reports the same fingerprint as the model it was made for."""
    state = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()}
    return TSR.weights_fingerprint(_StateView(state))


def _peft_config(model: nn.Module) -> LoraConfig:
    configs = getattr(model, "peft_config", {})
    if "default" not in configs:
        raise ValueError("the model has no LoRA adapter: call add_lora or load_adapter first")
    return configs["default"]


def save_adapter(model: TSR, out_dir, extra_metadata: dict | None = None) -> Path:
    """Write the adapter in peft's format plus `tsr_adapter.json`, atomically: the files go to a
    temporary folder that then replaces `out_dir`, so `out_dir` never holds a half-written
    adapter (an interrupted save leaves the previous one, or for an instant none)."""
    out_dir = Path(out_dir)
    config = _peft_config(model)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        config.save_pretrained(str(tmp))
        state = {
            PEFT_PREFIX + k: v.detach().cpu().contiguous()
            for k, v in lora_state_dict(model).items()
        }
        # r/alpha in the header too, so the weights file alone still loads with the right scale
        header = {"format": "pt", "r": str(config.r), "lora_alpha": str(config.lora_alpha)}
        header["lora_dropout"] = str(config.lora_dropout)
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata=header)
        metadata = {
            "base_model": getattr(model, "source", None),
            "base_fingerprint": base_fingerprint(model),
            "r": config.r,
            "alpha": config.lora_alpha,
            "dropout": config.lora_dropout,
            "targets": sorted(config.target_modules),
            "tsr_config": model.config.to_dict(),
            **(extra_metadata or {}),
        }
        (tmp / TSR_METADATA).write_text(json.dumps(metadata, indent=2, default=str))
        old = out_dir.with_name(f".{out_dir.name}.old")
        if out_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _read_course_pth(path: Path) -> dict[str, torch.Tensor]:
    """Course keys `[backbone.]transformer_blocks.N.attnX.to_Y.A.weight` -> peft names."""
    state = {}
    for key, value in read_state_dict(path).items():
        match = re.fullmatch(r"(?:backbone\.)?(.+)\.(A|B)(?:\.weight)?", key)
        if match is None:
            raise ValueError(
                f"{path}: key {key!r} is not a LoRA A/B weight; expected the course project's "
                "`transformer_blocks.N.attnX.to_Y.A.weight` keys"
            )
        state[f"backbone.{match.group(1)}.lora_{match.group(2)}.weight"] = value
    return state


def _read_adapter(path: Path) -> tuple[dict, dict, dict]:
    """Any supported adapter file -> (peft-named state, lora settings, our metadata).

    Settings (r, lora_alpha, lora_dropout) come from adapter_config.json beside the weights,
    else from the safetensors header (save_adapter writes them there too), else are empty.
    """
    if path.is_dir():
        if not (path / ADAPTER_WEIGHTS).is_file() or not (path / ADAPTER_CONFIG).is_file():
            raise FileNotFoundError(
                f"{path} has no {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}: not an adapter folder"
            )
        path = path / ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"adapter {path} does not exist")
    folder = path.parent
    metadata = (
        json.loads((folder / TSR_METADATA).read_text()) if (folder / TSR_METADATA).is_file() else {}
    )
    if path.suffix != ".safetensors":
        return _read_course_pth(path), {"lora_alpha": COURSE_ALPHA}, {}
    try:
        with safe_open(str(path), framework="pt") as file:
            header = file.metadata() or {}
            state = {k.removeprefix(PEFT_PREFIX): file.get_tensor(k) for k in file.keys()}
    except Exception as error:  # safetensors raises its own SafetensorError
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from error
    if (folder / ADAPTER_CONFIG).is_file():
        settings = json.loads((folder / ADAPTER_CONFIG).read_text())
    else:
        settings = {k: float(v) for k, v in header.items() if k in ("lora_alpha", "lora_dropout")}
    state = {re.sub(r"\.(lora_[AB])\.default\.", r".\1.", k): v for k, v in state.items()}
    return state, settings, metadata


def _check_fits(model: nn.Module, state: dict, source: Path) -> tuple[list[str], int]:
    """Target names and rank of an adapter state; a clear error if it does not fit the model."""
    linears = candidate_linears(model)
    names, ranks = [], set()
    for key, value in state.items():
        match = re.fullmatch(r"(.+)\.lora_A\.weight", key)
        if match is None:
            if not re.fullmatch(r".+\.lora_B\.weight", key):
                raise ValueError(f"{source}: unexpected key {key!r}; it is not a LoRA A/B weight")
            continue
        name, rank = match.group(1), value.shape[0]
        module = linears.get(name)
        if module is None:
            raise ValueError(
                f"{source} targets {name!r}, which this model does not have as a Linear layer: "
                "the adapter was made for another architecture or config"
            )
        b = state.get(f"{name}.lora_B.weight")
        expected_a, expected_b = (rank, module.in_features), (module.out_features, rank)
        if tuple(value.shape) != expected_a or b is None or tuple(b.shape) != expected_b:
            raise ValueError(
                f"{source}: {name} has A {tuple(value.shape)} and B "
                f"{None if b is None else tuple(b.shape)}; this model's layer needs A {expected_a} "
                f"and B {expected_b}: the adapter was made for a model of another size"
            )
        names.append(name)
        ranks.add(rank)
    if not ranks:
        raise ValueError(f"{source} holds no LoRA weights (no `*.lora_A.weight` keys)")
    if len(ranks) != 1:
        raise ValueError(f"{source}: expected one LoRA rank for all layers, found {sorted(ranks)}")
    return names, ranks.pop()


def load_adapter(model: TSR, path, alpha: float | None = None, dropout: float | None = None) -> TSR:
    """Load an adapter folder (ours), a bare peft `.safetensors` or the course project's
    `lora_weights.pth` into `model`, injecting LoRA layers if it has none yet.

    alpha and dropout default to what the files record; the course .pth records no alpha and
    gets its scripts' 16. Rank and targets always come from the weights themselves.
    """
    path = Path(path)
    state, settings, metadata = _read_adapter(path)
    alpha = settings.get("lora_alpha") if alpha is None else alpha
    if alpha is None:
        raise ValueError(
            f"{path} does not record its LoRA alpha (no {ADAPTER_CONFIG}): pass alpha="
        )
    dropout = settings.get("lora_dropout", 0.0) if dropout is None else dropout
    names, rank = _check_fits(model, state, path)
    existing = lora_layers(model)
    if not existing:
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names)
        config.base_model_name_or_path = metadata.get("base_model", getattr(model, "source", None))
        inject_adapter_in_model(config, model)
        model.train(model.training)
    elif (
        set(existing) != set(names)
        or _peft_config(model).r != rank
        or _peft_config(model).lora_alpha != alpha
    ):
        ours = _peft_config(model)
        raise ValueError(
            f"{path} (rank {rank}, alpha {alpha}, {len(names)} layers) does not match the "
            f"model's LoRA layers (rank {ours.r}, alpha {ours.lora_alpha}, {len(existing)} "
            "layers): load it into a model without LoRA"
        )
    dtype = lora_layers(model)[names[0]].lora_A["default"].weight.dtype
    result = set_peft_model_state_dict(model, {k: v.to(dtype) for k, v in state.items()})
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path}: adapter keys do not fit: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
        )
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    expected = metadata.get("base_fingerprint")
    if expected and expected != base_fingerprint(model):
        warnings.warn(
            f"{path} was trained on base weights {expected} ({metadata.get('base_model')}), but "
            f"this model's are {base_fingerprint(model)} ({getattr(model, 'source', '?')})",
            stacklevel=2,
        )
    return model


def export_course_adapter(model: TSR, path) -> Path:
    """Write the adapter as the course project's `lora_weights.pth` (A/B keys, alpha implied
    16: a different alpha is folded into B so the course inference gives the same outputs)."""
    config = _peft_config(model)
    rescale = config.lora_alpha / COURSE_ALPHA  # our scale alpha/r over the course's 16/r
    state = {}
    for key, value in lora_state_dict(model).items():
        match = re.fullmatch(r"(.+)\.lora_(A|B)\.weight", key)
        factor = rescale if match.group(2) == "B" else 1.0
        state[f"{match.group(1)}.{match.group(2)}.weight"] = value.detach().cpu() * factor
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path
