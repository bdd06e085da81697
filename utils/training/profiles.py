"""Model profiles: what depends on the model, as one record per model size, with the reason for
each value. The profiles themselves are data in `utils/training/recipes.py`; this module
holds their type, reads a model's config without its weights, and checks that a dataset was
built for a profile (its folder name says which, `Profile.data_dir`, and `check_dataset`
refuses a folder whose dataset.json settings are not the profile's).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from tsr.config import TSRConfig, load_config
from tsr.io import SHIPPED_MODELS
from utils.training.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    dataset: dict  # prepare_dataset settings of the workbook's dataset (notebook 01)
    smoke_dataset: dict  # the same at CI sizes (SMOKE=1): seconds, not minutes
    data_dir: str  # notebooks' dataset folder: its name says which profile built it
    smoke_data_dir: str
    recipe: dict  # TrainConfig fields on every device
    device_recipe: dict  # device type ("cpu", "cuda") -> TrainConfig fields that depend on it
    smoke_recipe: dict  # TrainConfig fields replaced at CI sizes
    steps: int  # notebook 03's max_steps (early stopping may end sooner)
    smoke_steps: int
    mesh_resolution: int  # marching-cubes grid of the meshes notebooks show and evaluate
    chunk_size: dict  # device type -> points per decoder call when querying a grid
    why: dict  # setting -> the reason for its value

    def dataset_settings(self, smoke: bool = False) -> dict:
        return self.smoke_dataset if smoke else self.dataset

    def data_folder(self, smoke: bool = False) -> Path:
        return Path(self.smoke_data_dir if smoke else self.data_dir)

    def train_settings(self, device: str | torch.device = "cpu", smoke: bool = False) -> dict:
        """TrainConfig fields for a device: the recipe, the device's, then CI sizes."""
        kind = torch.device(device).type
        if kind not in self.device_recipe:
            raise ValueError(f"profile {self.name!r} has no settings for device {kind!r}")
        return {**self.recipe, **self.device_recipe[kind], **(self.smoke_recipe if smoke else {})}

    def summary(self, device: str | torch.device = "cpu", smoke: bool = False) -> str:
        """One line: the data, the supervision, losses and optimisation, the mesh grid."""
        data = self.dataset_settings(smoke)
        config = TrainConfig(**self.train_settings(device, smoke))
        if config.sampling == "patches":
            side = config.patch_size
            supervision = f"{config.rays_per_object // side**2} patch of {side}² per object"
        else:
            supervision = f"{config.rays_per_object} rays per object"
        weights = {
            "rgb": config.lambda_rgb,
            "lpips": config.lambda_lpips,
            "mask": config.lambda_mask,
            "occupancy": config.lambda_occupancy,
        }
        losses = " + ".join(f"{w:g} {term}" for term, w in weights.items() if w > 0)
        return (
            f"profile {self.name!r}: {data['n_objects']} objects x {data['n_views']} views at "
            f"{data['size']}² in {self.data_folder(smoke)}; {supervision}, loss {losses}, "
            f"lr {config.lr:g}, batch {config.batch_size} x {config.grad_accum_steps} on "
            f"{torch.device(device).type}; meshes at {self.mesh_resolution}³"
        )

    def settings(self, device: str | torch.device = "cpu", smoke: bool = False) -> dict:
        """Every setting in effect on a device, by group: dataset, training (every TrainConfig
        field, defaults included), mesh."""
        config = TrainConfig(**self.train_settings(device, smoke))
        return {
            "dataset": dict(self.dataset_settings(smoke)),
            "training": {
                "steps": self.smoke_steps if smoke else self.steps,
                **dataclasses.asdict(config),
            },
            "mesh": {
                "mesh_resolution": self.mesh_resolution,
                "chunk_size": self.chunk_size[torch.device(device).type],
                "mc_threshold": "the model's",
            },
        }

    def chosen(self) -> set[str]:
        """The TrainConfig fields this profile sets itself (not left at their defaults)."""
        recipes = (self.recipe, *self.device_recipe.values(), self.smoke_recipe)
        return {key for recipe in recipes for key in recipe}


def model_config(model) -> TSRConfig:
    """The config of a TSR, a TSRConfig, a shipped name, a folder or a Hub repo id (only its
    config.yaml is fetched: the profile is known before the 1.7 GB of weights are)."""
    if isinstance(model, TSRConfig):
        return model
    if isinstance(model, torch.nn.Module):
        return model.config
    name = os.fspath(model)
    folder = SHIPPED_MODELS.get(name, Path(name))
    if folder.is_dir():
        return load_config(folder / "config.yaml")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return load_config(hf_hub_download(name, "config.yaml"))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as error:
        raise FileNotFoundError(
            f"{name!r} is not a folder, and its config.yaml could not be fetched from the Hub "
            f"({type(error).__name__}): put config.yaml and model.ckpt in a folder and use that"
        ) from error


def check_dataset(root: str | Path, profile: Profile, smoke: bool = False) -> None:
    """Refuse a dataset whose dataset.json says it was built with other sizes than this
    profile's: a 128² set fed to a 512² model would be silently upsampled 4x."""
    root = Path(root)
    info_path = root / "dataset.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"{root} has no dataset.json: build it with notebook 01")
    info = json.loads(info_path.read_text())
    found = {"occupancy_points": 0, **info["settings"]}
    wanted = profile.dataset_settings(smoke)
    different = {
        k: (found.get(k), wanted[k])
        for k in ("size", "n_views", "occupancy_points")
        if found.get(k) != wanted[k]
    }
    if different:
        shown = ", ".join(f"{k} {have} (needs {need})" for k, (have, need) in different.items())
        raise ValueError(
            f"{root} was built with other settings than the {profile.name!r} profile's: {shown}. "
            f"Use DATA = {str(profile.data_folder(smoke))!r} (notebook 01 builds it), or delete "
            f"{root} to rebuild it"
        )
