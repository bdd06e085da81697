"""What every notebook does first: find the repository, seed, and make the dataset and the
adapter an earlier notebook would have made, so every notebook also runs alone."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from tsr.model import TSR
from utils.data.build import prepare_dataset
from utils.data.dataset import MultiViewDataset
from utils.training import adapters, lora, profiles, recipes


def repo_root() -> Path:
    """The repository folder (pyproject.toml + tsr/): from the working folder upwards, else
    where this package lives. Notebooks chdir there, so their paths are repository paths."""
    here = Path.cwd().resolve()
    for folder in (here, *here.parents, Path(__file__).resolve().parents[2]):
        if (folder / "pyproject.toml").is_file() and (folder / "tsr").is_dir():
            return folder
    raise FileNotFoundError(f"no repository (pyproject.toml and tsr/) above {here}")


def seed_everything(seed: int = 0) -> None:
    """Python's, NumPy's legacy and torch's global generators (fit() seeds its own too)."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - the global generator third-party code draws from
    torch.manual_seed(seed)


def ensure_dataset(root: str | Path, profile: profiles.Profile, smoke: bool = False) -> Path:
    """`root` as it is when it holds a dataset built with the profile's sizes (split.json and
    dataset.json); otherwise build the profile's there first (notebook 01's, or the SMOKE
    set). A dataset of another profile's sizes is refused, never silently reused."""
    root = Path(root)
    if not (root / "split.json").is_file():
        print(f"no dataset in {root} yet (notebook 01 builds it): building it now")
        prepare_dataset(root, **profile.dataset_settings(smoke))
    profiles.check_dataset(root, profile, smoke)
    return root


def ensure_adapter(
    model_name: str, data: str | Path, run_dir: str | Path, device: str = "cpu",
    smoke: bool = False, steps: int = 60,
) -> Path:  # fmt: skip
    """`run_dir/adapter` when notebook 03 made it for these base weights; otherwise a short
    LoRA run of `steps` steps at the model's profile makes it (the fingerprint in
    tsr_adapter.json tells), on `data` (built first if missing)."""
    from utils.training.train import TrainConfig, fit  # the training loop only when needed

    adapter = Path(run_dir) / "adapter"
    model = TSR.from_pretrained(model_name)
    profile = recipes.profile_for(model, device, verbose=False)
    data = ensure_dataset(data, profile, smoke)
    metadata = adapter / adapters.TSR_METADATA
    if metadata.is_file():
        if json.loads(metadata.read_text()).get("base_fingerprint") == model.weights_fingerprint():
            return adapter
        print(f"{adapter} was trained on other base weights than {model_name!r}")
    print(f"no adapter for {model_name!r} in {adapter}: a short run of {steps} steps makes one")
    lora.add_lora(model, r=16, alpha=16, dropout=0.05)  # notebook 03's adapter
    train = MultiViewDataset(data, "train", 4, cond_size=model.config.cond_image_size)
    settings = profile.train_settings(device, smoke)
    config = TrainConfig(**settings, max_steps=steps, val_every=0, checkpoint_every=steps)
    # overwrite: the run there made no adapter for these weights; this one replaces it
    return fit(model.to(device), train, config, output_dir=run_dir, overwrite=True).artefact
