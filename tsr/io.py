"""Finding and reading model weights: a local folder, the shipped models, or the Hugging Face Hub.

Checkpoints are untrusted files: `.ckpt`/`.pth` are read with `weights_only=True`, and every
error names the file and says what to do.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors

from .config import ASSETS
from .errors import UserInputError, brief

# name -> folder with config.yaml + weights. "tiny": random weights in the official format,
# for parity tests; "classroom": a small TripoSR pretrained by pretrain.py (recipe.json there).
SHIPPED_MODELS = {"tiny": ASSETS / "tiny", "classroom": ASSETS / "classroom"}
# What notebooks and CLIs load when no model is given: shipped, so nothing is downloaded.
DEFAULT_MODEL = "classroom"
OFFICIAL_REPO = "stabilityai/TripoSR"


def resolve_model_files(
    name_or_dir: str | os.PathLike, config_name: str, weight_name: str
) -> tuple[Path, Path]:
    """Where the config and the weights are: a shipped name, a local folder or a Hub repo id."""
    name = str(name_or_dir)
    folder = SHIPPED_MODELS.get(name, Path(name))
    if folder.is_dir():
        config_path = folder / config_name
        weight_path = folder / weight_name
        if not weight_path.is_file():
            # A folder saved by `TSR.save_pretrained` may hold safetensors instead of a .ckpt.
            alternative = weight_path.with_suffix(".safetensors")
            weight_path = alternative if alternative.is_file() else weight_path
        missing = [p.name for p in (config_path, weight_path) if not p.is_file()]
        if missing:
            raise UserInputError(
                f"weights not found: missing {missing}", folder,
                f"put the official config.yaml and model.ckpt there (from "
                f"https://huggingface.co/{OFFICIAL_REPO}), or use --pretrained tiny for the "
                "embedded model",
            )  # fmt: skip
        return config_path, weight_path
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise UserInputError(
            "neither a folder nor a Hugging Face repo id (owner/name)", name,
            f"pass a folder with config.yaml and model.ckpt, {OFFICIAL_REPO!r}, or a shipped "
            f"model ({', '.join(SHIPPED_MODELS)})",
        )  # fmt: skip
    return _download_from_hub(name, config_name, weight_name)


def _download_from_hub(repo_id: str, config_name: str, weight_name: str) -> tuple[Path, Path]:
    """Hub download through huggingface_hub: honours HF_HUB_OFFLINE, HF_HOME and its cache."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        config_path = hf_hub_download(repo_id, config_name)
        weight_path = hf_hub_download(repo_id, weight_name)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
        raise UserInputError(
            f"could not get {config_name} and {weight_name} from the Hub or its cache "
            f"({type(error).__name__})", repo_id,
            "offline: download them elsewhere, put them in a folder and pass that folder; or "
            "use --pretrained tiny for the embedded model",
        ) from error  # fmt: skip
    return Path(config_path), Path(weight_path)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A plain state dict from `.safetensors` or a torch checkpoint (weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError("weights file not found", path, "check the path")
    if path.suffix == ".safetensors":
        try:
            return load_safetensors(str(path))
        except Exception as error:  # safetensors raises its own SafetensorError
            raise UserInputError(
                f"not a readable safetensors file ({error})", path, "download or save it again"
            ) from error
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UserInputError(
            "holds objects other than tensors, which weights_only loading refuses for safety",
            path, "re-save it as a plain state_dict (torch.save(model.state_dict(), ...)) or "
            "as safetensors",
        ) from error  # fmt: skip
    except Exception as error:  # a damaged file raises anything from EOFError to IndexError
        raise UserInputError(
            f"not a readable torch checkpoint ({brief(error)})", path,
            "download or save it again",
        ) from error  # fmt: skip
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # Lightning-style wrapper
    if not isinstance(state, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        raise UserInputError(
            "not a state dict (a mapping of names to tensors)", path, "pass a model checkpoint"
        )
    return state


def check_finite(state: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Refuse weights holding NaN or inf, naming the tensors: a model built on them renders
    nothing and meshes nothing, and training on them stops at its first step."""
    broken = [
        key
        for key, value in state.items()
        if value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]
    if broken:
        shown = ", ".join(broken[:5]) + (f", ... ({len(broken)} in all)" if len(broken) > 5 else "")
        raise UserInputError(
            f"weights hold NaN or inf values in {shown}", source,
            "the file is damaged or was saved from a diverged run: use another copy or an "
            "earlier checkpoint",
        )  # fmt: skip


def check_state_dict(
    expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: str, config: str
) -> None:
    """Strict key and shape check with a message that names the first differences."""
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    misshaped = [
        f"{key} {tuple(found[key].shape)} (expected {tuple(value.shape)})"
        for key, value in expected.items()
        if key in found and found[key].shape != value.shape
    ]
    if not (missing or unexpected or misshaped):
        return
    problems = []
    for label, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("mis-shaped", misshaped),
    ):
        if items:
            shown = ", ".join(items[:5]) + (
                f", ... ({len(items)} in all)" if len(items) > 5 else ""
            )
            problems.append(f"{label}: {shown}")
    raise UserInputError(
        f"does not fit the model built from {config} (expected a TripoSR checkpoint of "
        f"{len(expected)} tensors, found {len(found)}): " + "; ".join(problems), source,
        "pass the config.yaml that belongs to these weights",
    )  # fmt: skip
