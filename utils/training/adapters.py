"""LoRA adapter files: save, load (peft's folder or the course project's .pth), export.

See `utils.training.lora` for what an adapter folder holds and how plain peft reads it.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from tsr.errors import UserInputError
from tsr.files import atomic_folder, save_torch
from tsr.io import check_finite, read_state_dict
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
    """Write the adapter in peft's format plus `tsr_adapter.json`, atomically: `out_dir` is
    replaced as a whole, so it never holds a half-written adapter (an interrupted save or a
    full disk leaves the previous one)."""
    out_dir = Path(out_dir)
    config = _peft_config(model)
    state = {
        PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in lora_state_dict(model).items()
    }
    # r/alpha in the header too, so the weights file alone still loads with the right scale
    header = {"format": "pt", "r": str(config.r), "lora_alpha": str(config.lora_alpha)}
    header["lora_dropout"] = str(config.lora_dropout)
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
    with atomic_folder(out_dir) as folder:
        config.save_pretrained(str(folder))
        # peft keeps target_modules as a set and writes it in hash order, which differs
        # between processes: sorted, equal adapters have equal files
        settings = json.loads((folder / ADAPTER_CONFIG).read_text())
        settings["target_modules"] = sorted(settings["target_modules"])
        (folder / ADAPTER_CONFIG).write_text(json.dumps(settings, indent=2, sort_keys=True))
        (folder / ADAPTER_WEIGHTS).write_bytes(safetensors_bytes(state, header))
        (folder / TSR_METADATA).write_text(json.dumps(metadata, indent=2, default=str))
    return out_dir


def safetensors_bytes(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file with its metadata in sorted order. safetensors writes metadata in
    hash order, which differs between processes: two runs with equal weights and settings
    gave different adapter files. Format: 8-byte little-endian header length, the JSON
    header (space-padded so the data stays 8-byte aligned), then the tensor data."""
    plain = save(state)  # without metadata it is deterministic
    length = int.from_bytes(plain[:8], "little")
    header = {"__metadata__": dict(sorted(metadata.items())), **json.loads(plain[8 : 8 + length])}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + plain[8 + length :]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserInputError(
            f"not valid JSON ({error})", path,
            "restore the file from the run folder it came from, or save the adapter again",
        ) from error  # fmt: skip


def _read_course_pth(path: Path) -> dict[str, torch.Tensor]:
    """Course keys `[backbone.]transformer_blocks.N.attnX.to_Y.A.weight` -> peft names."""
    state = {}
    for key, value in read_state_dict(path).items():
        match = re.fullmatch(r"(?:backbone\.)?(.+)\.(A|B)(?:\.weight)?", key)
        if match is None:
            raise UserInputError(
                f"key {key!r} is not a LoRA A/B weight", path,
                "pass the course project's lora_weights.pth (keys "
                "`transformer_blocks.N.attnX.to_Y.A.weight`) or an adapter folder",
            )  # fmt: skip
        state[f"backbone.{match.group(1)}.lora_{match.group(2)}.weight"] = value
    return state


def _read_adapter(path: Path) -> tuple[dict, dict, dict]:
    """Any supported adapter file -> (peft-named state, lora settings, our metadata).

    Settings (r, lora_alpha, lora_dropout) come from adapter_config.json beside the weights,
    else from the safetensors header (save_adapter writes them there too), else are empty.
    """
    if path.is_dir():
        if not (path / ADAPTER_WEIGHTS).is_file() or not (path / ADAPTER_CONFIG).is_file():
            raise UserInputError(
                f"not an adapter folder (no {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})", path,
                "pass the adapter/ folder of a fine_tuning.py run, or its lora_weights.pth",
            )  # fmt: skip
        path = path / ADAPTER_WEIGHTS
    if not path.is_file():
        raise UserInputError(
            "adapter not found", path, "pass an adapter folder, .safetensors or lora_weights.pth"
        )
    folder = path.parent
    metadata = _read_json(folder / TSR_METADATA) if (folder / TSR_METADATA).is_file() else {}
    if path.suffix != ".safetensors":
        return _read_course_pth(path), {"lora_alpha": COURSE_ALPHA}, {}
    try:
        with safe_open(str(path), framework="pt") as file:
            header = file.metadata() or {}
            state = {k.removeprefix(PEFT_PREFIX): file.get_tensor(k) for k in file.keys()}
    except Exception as error:  # safetensors raises its own SafetensorError
        raise UserInputError(
            f"not a readable safetensors file ({error})", path, "save or copy the adapter again"
        ) from error
    if (folder / ADAPTER_CONFIG).is_file():
        settings = _read_json(folder / ADAPTER_CONFIG)
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
                raise UserInputError(
                    f"unexpected key {key!r}, not a LoRA A/B weight", source,
                    "pass an adapter saved by save_adapter or peft",
                )  # fmt: skip
            continue
        name, rank = match.group(1), value.shape[0]
        module = linears.get(name)
        if module is None:
            raise UserInputError(
                f"the adapter targets {name!r}, which this model does not have as a Linear layer",
                source, "load it onto the base model it was trained on (see its tsr_adapter.json)",
            )  # fmt: skip
        b = state.get(f"{name}.lora_B.weight")
        expected_a, expected_b = (rank, module.in_features), (module.out_features, rank)
        if tuple(value.shape) != expected_a or b is None or tuple(b.shape) != expected_b:
            raise UserInputError(
                f"{name} has A {tuple(value.shape)} and B {None if b is None else tuple(b.shape)}"
                f", this model's layer needs A {expected_a} and B {expected_b}", source,
                "the adapter was made for a model of another size: load it onto that model",
            )  # fmt: skip
        names.append(name)
        ranks.add(rank)
    if not ranks:
        raise UserInputError(
            "no LoRA weights (no `*.lora_A.weight` keys)", source, "pass an adapter file"
        )
    if len(ranks) != 1:
        raise UserInputError(
            f"LoRA ranks {sorted(ranks)} in one adapter", source, "pass an adapter of one rank"
        )
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
        raise UserInputError(
            f"the LoRA alpha is not recorded (no {ADAPTER_CONFIG})", path,
            "pass alpha= (fine_tuning.py's --alpha of the run)",
        )  # fmt: skip
    dropout = settings.get("lora_dropout", 0.0) if dropout is None else dropout
    check_finite(state, path)
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
        raise UserInputError(
            f"the adapter (rank {rank}, alpha {alpha}, {len(names)} layers) does not match the "
            f"model's LoRA layers (rank {ours.r}, alpha {ours.lora_alpha}, {len(existing)} "
            "layers)", path, "load it into a model without LoRA",
        )  # fmt: skip
    dtype = lora_layers(model)[names[0]].lora_A["default"].weight.dtype
    result = set_peft_model_state_dict(model, {k: v.to(dtype) for k, v in state.items()})
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise UserInputError(
            f"adapter keys do not fit: missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}", path, "load it onto the model it was made for",
        )  # fmt: skip
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
    return save_torch(state, path)
