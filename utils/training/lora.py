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

import math
import re

import torch
from peft import (
    LoraConfig,
    get_peft_model_state_dict,
    inject_adapter_in_model,
)
from peft.tuners.lora import LoraLayer
from torch import nn

from tsr.errors import UserInputError
from tsr.model import TSR

_BLOCKS = r"backbone\.transformer_blocks\.\d+"
# Named target sets; a string value is a regular expression matched against the full name.
TARGET_PRESETS: dict[str, str | list] = {
    "attn": _BLOCKS + r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",
    "self": _BLOCKS + r"\.attn1\.(to_q|to_k|to_v|to_out\.0)",
    "cross": _BLOCKS + r"\.attn2\.(to_q|to_k|to_v|to_out\.0)",
    "attn+ff": _BLOCKS + r"\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2)",
}


def candidate_linears(model: nn.Module) -> dict[str, nn.Module]:
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
    linears = candidate_linears(model)
    if isinstance(targets, str) and (targets in TARGET_PRESETS or targets.startswith("re:")):
        preset = TARGET_PRESETS.get(targets, targets.removeprefix("re:"))
        if isinstance(preset, list):
            return resolve_targets(model, preset)
        names = [name for name in linears if re.fullmatch(preset, name)]
        if not names:
            raise UserInputError(
                f"LoRA targets {targets!r} match no Linear layer of this model", "targets",
                "print model.named_modules() to see the names",
            )  # fmt: skip
        return names
    if isinstance(targets, str):
        raise UserInputError(
            f"unknown LoRA target preset {targets!r}", "targets",
            f"choose one of {sorted(TARGET_PRESETS)}, a list of module names, or a regex "
            "written 're:PATTERN'",
        )  # fmt: skip
    names, unmatched = [], []
    for target in targets:
        hits = [n for n in linears if n == target or n.endswith("." + target)]
        unmatched += [] if hits else [target]
        names += [n for n in hits if n not in names]
    if unmatched:
        raise UserInputError(
            f"LoRA targets {unmatched} match no Linear layer of this model", "targets",
            "print model.named_modules() to see the names",
        )  # fmt: skip
    return names


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def add_lora(
    model: TSR, r: int = 16, alpha: float = 16, dropout: float = 0.05, targets="attn",
    seed: int = 0,
) -> TSR:  # fmt: skip
    """Wrap the target Linear layers with LoRA (A random, B zero: the output is unchanged),
    freeze every base weight and keep the adapter in float32 whatever the base dtype.

    A is drawn with torch's generator seeded by `seed` (and its state restored afterwards):
    peft draws from the global one, which torch seeds from the OS, so two runs with the same
    settings used to start from different adapters."""
    if lora_layers(model):
        raise ValueError("the model already has LoRA layers: use a fresh model, or load_adapter")
    problems = [f"r={r!r} (an integer >= 1)"] if not (isinstance(r, int) and r >= 1) else []
    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha > 0):
        problems.append(f"alpha={alpha!r} (a finite number > 0)")
    if not (isinstance(dropout, int | float) and 0 <= dropout < 1):
        problems.append(f"dropout={dropout!r} (a probability in [0, 1))")
    if problems:
        raise UserInputError(
            "LoRA settings out of range: " + "; ".join(problems), "r, alpha, dropout",
            "pass values in those ranges (the course project's: r 16, alpha 16, dropout 0.05)",
        )  # fmt: skip
    names = resolve_targets(model, targets)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names)
    config.base_model_name_or_path = getattr(model, "source", None)
    devices = [p.device for p in model.parameters() if p.device.type == "cuda"][:1]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, model)
    model.train(model.training)  # new LoRA dropouts start in train mode; follow the model's mode
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)
        if "lora_" in name and parameter.is_floating_point():
            parameter.data = parameter.data.float()  # fp32 master weights for the optimiser
    return model


def lora_settings(model: nn.Module) -> dict | None:
    """What an adapter was made with: {"r", "alpha", "dropout", "targets"}; None without one."""
    config = getattr(model, "peft_config", {}).get("default")
    if config is None:
        return None
    return {
        "r": config.r,
        "alpha": config.lora_alpha,
        "dropout": config.lora_dropout,
        "targets": sorted(config.target_modules),
    }


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
    for name, layer in lora_layers(model).items():
        entry = by_kind.setdefault(_kind(name), {"modules": 0, "params": 0})
        entry["modules"] += 1
        entry["params"] += sum(p.numel() for n, p in layer.named_parameters() if "lora_" in n)
    return {
        "trainable": trainable,
        "total": total,
        "percent": 100.0 * trainable / max(total, 1),
        "n_targets": len(lora_layers(model)),
        "by_kind": by_kind,
    }


def lora_size_table(model: nn.Module, ranks=(4, 8, 16, 32), targets="attn") -> str:
    """Markdown table: adapter parameters and fp32 size per rank, from the layer shapes alone
    (r * (in + out) per wrapped Linear), so a meta-device model is enough."""
    linears = candidate_linears(model)
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


def update_norms(model: nn.Module) -> list[dict]:
    """What the adapter learned, per wrapped layer: the update dW = (alpha / r) B A it adds to
    the frozen weight W. -> one record per layer, in model order: layer, kind, block,
    update_norm = ||dW||_F, relative = ||dW||_F / ||W||_F, and dW's r singular values
    (descending; few large ones = the layer moved along few directions)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError(
            "the model has no LoRA layers (a merged adapter leaves none): load the adapter "
            "with adapters.load_adapter and do not merge it"
        )
    rows = []
    for name, layer in layers.items():
        adapter = layer.active_adapters[0]
        down = layer.lora_A[adapter].weight.detach().float()  # A: (r, d_in)
        up = layer.lora_B[adapter].weight.detach().float()  # B: (d_out, r)
        # B = Qb Rb and A^T = Qa Ra with orthonormal columns, so B A = Qb (Rb Ra^T) Qa^T has the
        # singular values of the r x r core: no d_out x d_in matrix is ever decomposed.
        core = torch.linalg.qr(up).R @ torch.linalg.qr(down.T).R.T  # (r, r)
        singular = float(layer.scaling[adapter]) * torch.linalg.svdvals(core)  # (r,)
        norm = float(singular.norm())  # ||dW||_F = sqrt(sum of squared singular values)
        block = re.search(r"transformer_blocks\.(\d+)\.", name)
        rows.append({
            "layer": name, "kind": _kind(name), "block": int(block.group(1)) if block else None,
            "update_norm": norm,
            "relative": norm / float(layer.get_base_layer().weight.detach().float().norm()),
            "singular_values": singular.tolist(),
        })  # fmt: skip
    return rows


def merge_adapter(model: TSR) -> TSR:
    """Fold each LoRA update into its base Linear and drop the wrappers: plain TSR again."""
    for name, layer in list(lora_layers(model).items()):
        layer.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


def gradient_checkpointing(model: TSR, enabled: bool = True) -> None:
    """Recompute backbone blocks in backward instead of storing their activations."""
    model.backbone.gradient_checkpointing = enabled
