"""LoRA adapters for TSR through peft: add, count, save, load, convert, merge.

The adapter is injected in place (`peft.inject_adapter_in_model`), so the model stays a `TSR`
and `encode`, `render_rays` and `extract_mesh` work unchanged. Every saved adapter records its
own rank, alpha and targets, so inference never has to guess them (the course project's
inference hard-coded r=16, alpha=16).

Files an adapter folder holds:
- `adapter_config.json` + `adapter_model.safetensors`: peft's format; keys carry the
  `base_model.model.` prefix PeftModel.save_pretrained writes; r/alpha also sit in the
  safetensors header, so the weights file alone loads with the right scale.
- `tsr_adapter.json`: ours: base model id, a fingerprint of the base weights, the tsr config
  and whatever the caller passes (e.g. the training config).

Plain peft reads the folder too (tests/test_lora.py checks both, peft 0.21):
- `PeftModel.from_pretrained(TSR.from_pretrained(...), folder)`: a PeftModel wrapping our
  custom nn.Module; attribute access (`.encode`, `.render_rays`) reaches the TSR inside.
- `inject_adapter_in_model(LoraConfig.from_pretrained(folder), model)` then
  `set_peft_model_state_dict(model, load_peft_weights(folder))`: the TSR itself, adapted in
  place (this is what `load_adapter` does, plus the checks and the course format).
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
from peft import (
    LoraConfig,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from tsr.io import read_state_dict
from tsr.model import TSR

_BLOCKS = r"backbone\.transformer_blocks\.\d+"
# Named target sets; a string value is a regular expression matched against the full name.
TARGET_PRESETS: dict[str, str | list] = {
    "attn": _BLOCKS + r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",
    "self": _BLOCKS + r"\.attn1\.(to_q|to_k|to_v|to_out\.0)",
    "cross": _BLOCKS + r"\.attn2\.(to_q|to_k|to_v|to_out\.0)",
    "attn+ff": _BLOCKS + r"\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2)",
}
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TSR_METADATA = "tsr_adapter.json"
PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before module names
COURSE_ALPHA = 16.0  # the course project's .pth has no alpha; its scripts always used 16


def _candidate_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Linear layers LoRA may wrap, by name; already-wrapped layers keep their original name."""
    found = {}
    for name, module in model.named_modules():
        if "lora_" in name or name.endswith(".base_layer"):
            continue
        if isinstance(module, (nn.Linear, LoraLayer)):
            found[name] = module
    return found


def resolve_targets(model: nn.Module, targets: str | list[str]) -> list[str]:
    """Full module names for a preset (`"attn"`), a list of names (or peft-style name
    suffixes such as `"to_q"`) or a regex prefixed `re:`. Raises if nothing matches."""
    linears = _candidate_linears(model)
    if isinstance(targets, str) and (targets in TARGET_PRESETS or targets.startswith("re:")):
        preset = TARGET_PRESETS.get(targets, targets.removeprefix("re:"))
        if isinstance(preset, list):
            return resolve_targets(model, preset)
        names = [name for name in linears if re.fullmatch(preset, name)]
        if not names:
            raise ValueError(
                f"LoRA targets {targets!r} match no Linear layer of this model; print "
                "model.named_modules() to see the names"
            )
        return names
    if isinstance(targets, str):
        raise ValueError(
            f"unknown LoRA target preset {targets!r}: choose one of {sorted(TARGET_PRESETS)}, "
            "a list of module names, or a regex written 're:PATTERN'"
        )
    names, unmatched = [], []
    for target in targets:
        hits = [n for n in linears if n == target or n.endswith("." + target)]
        unmatched += [] if hits else [target]
        names += [n for n in hits if n not in names]
    if unmatched:
        raise ValueError(f"LoRA targets {unmatched} match no Linear layer of this model")
    return names


def _lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def add_lora(
    model: TSR, r: int = 16, alpha: float = 16, dropout: float = 0.05, targets="attn"
) -> TSR:
    """Wrap the target Linear layers with LoRA (A random, B zero: the output is unchanged),
    freeze every base weight and keep the adapter in float32 whatever the base dtype."""
    if _lora_layers(model):
        raise ValueError("the model already has LoRA layers: use a fresh model, or load_adapter")
    names = resolve_targets(model, targets)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names)
    config.base_model_name_or_path = getattr(model, "source", None)
    inject_adapter_in_model(config, model)
    model.train(model.training)  # new LoRA dropouts start in train mode; follow the model's mode
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)
        if "lora_" in name and parameter.is_floating_point():
            parameter.data = parameter.data.float()  # fp32 master weights for the optimiser
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors, peft-named without adapter name: `<module>.lora_A.weight`."""
    # No embedding-layer check: it would look up the base model's config.json on the Hub.
    return get_peft_model_state_dict(model, save_embedding_layers=False)


def _kind(name: str) -> str:
    """`backbone.transformer_blocks.3.attn1.to_q` -> `attn1.to_q` (what a target is per block)."""
    return re.sub(r"^.*transformer_blocks\.\d+\.", "", name)


def trainable_parameter_report(model: nn.Module) -> dict:
    """Trainable and total parameter counts, percent, and counts per kind of target layer."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    by_kind: dict[str, dict[str, int]] = {}
    for name, layer in _lora_layers(model).items():
        entry = by_kind.setdefault(_kind(name), {"modules": 0, "params": 0})
        entry["modules"] += 1
        entry["params"] += sum(p.numel() for n, p in layer.named_parameters() if "lora_" in n)
    return {
        "trainable": trainable,
        "total": total,
        "percent": 100.0 * trainable / max(total, 1),
        "n_targets": len(_lora_layers(model)),
        "by_kind": by_kind,
    }


def lora_size_table(model: nn.Module, ranks=(4, 8, 16, 32), targets="attn") -> str:
    """Markdown table: adapter parameters and fp32 size per rank, from the layer shapes alone
    (r * (in + out) per wrapped Linear), so a meta-device model is enough."""
    linears = _candidate_linears(model)
    names = resolve_targets(model, targets)
    base_total = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    per_rank = sum(linears[n].in_features + linears[n].out_features for n in names)
    label = targets if isinstance(targets, str) else "listed"
    rows = [
        f"LoRA on {len(names)} Linear layers (targets: {label})",
        "",
        "| r | trainable parameters | % of the base model | adapter file (fp32) |",
        "|---:|---:|---:|---:|",
    ]
    for r in ranks:
        count = r * per_rank
        percent = 100 * count / base_total
        rows.append(f"| {r} | {count:,} | {percent:.3f} % | {count * 4 / 2**20:.1f} MB |")
    return "\n".join(rows)


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
    linears = _candidate_linears(model)
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
    existing = _lora_layers(model)
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
    dtype = _lora_layers(model)[names[0]].lora_A["default"].weight.dtype
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


def merge_adapter(model: TSR) -> TSR:
    """Fold each LoRA update into its base Linear and drop the wrappers: plain TSR again."""
    for name, layer in list(_lora_layers(model).items()):
        layer.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


def gradient_checkpointing(model: TSR, enabled: bool = True) -> None:
    """Recompute backbone blocks in backward instead of storing their activations."""
    model.backbone.gradient_checkpointing = enabled
