"""Model profiles (utils/training/recipes.py, profiles.py): chosen from the model's config, the classroom
profile is the README's measured recipe, the official one feeds the model its own input size
with the paper's losses, and a dataset of one profile is refused by another."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from tsr.config import named_config
from utils.notebook import setup
from utils.training import profiles, recipes
from utils.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def readme_command(script: str, first_flag: str) -> dict[str, str]:
    """The flags of the README's `python SCRIPT FIRST_FLAG ...` command (continued lines)."""
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    line = next(
        line for line in text.splitlines() if line.startswith(f"python {script} {first_flag}")
    )
    words = shlex.split(line.split("#")[0])[2:]
    return {words[i].lstrip("-"): words[i + 1] for i in range(0, len(words), 2)}


def test_the_profile_follows_the_models_config_read_without_its_weights(tmp_path, capsys):
    folder = tmp_path / "full-size"  # config.yaml only: the 1.7 GB of weights are not needed
    folder.mkdir()
    (folder / "config.yaml").write_text(named_config("official").to_yaml())
    assert recipes.profile_for(folder, "cuda") is recipes.OFFICIAL
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "'official'" in printed[0] and "128²" in printed[0]
    assert recipes.profile_for(named_config("official"), verbose=False) is recipes.OFFICIAL
    for small in ("classroom", "tiny"):
        assert recipes.profile_for(small, verbose=False) is recipes.CLASSROOM


def test_the_classroom_profile_is_the_readmes_measured_recipe():
    flags = readme_command("fine_tuning.py", "--input_folder data/parts")
    for device in ("cpu", "cuda"):
        config = TrainConfig(**recipes.CLASSROOM.train_settings(device))
        assert config.batch_size == int(flags["batch_size"])
        assert config.lr == float(flags["lr"])
        assert config.rays_per_object == int(flags["rays"])
        assert config.sampling == "rays"
        assert config.early_stopping_patience == int(flags["early_stopping_patience"])
        for name in ("lambda_mask", "lambda_lpips", "lambda_occupancy", "occupancy_sdf_scale"):
            assert getattr(config, name) == float(flags[name]), name
    data = readme_command("prepare_data.py", "--out data/parts")
    assert recipes.CLASSROOM.dataset == {
        "families": tuple(data["family"].split(",")), "n_objects": int(data["n"]),
        "n_views": int(data["views"]), "size": int(data["size"]), "seed": int(data["seed"]),
        "occupancy_points": int(data["occupancy-points"]),
    }  # fmt: skip
    assert recipes.CLASSROOM.dataset["size"] == profiles.model_config("classroom").cond_image_size


def test_the_official_profile_feeds_the_model_its_input_size_with_the_papers_losses():
    official = recipes.OFFICIAL
    assert official.dataset["size"] == named_config("official").cond_image_size == 512
    for device in ("cpu", "cuda"):
        for smoke in (False, True):
            config = TrainConfig(**official.train_settings(device, smoke))
            size = official.dataset_settings(smoke)["size"]
            assert config.sampling == "patches" and config.patch_size <= size
            assert config.rays_per_object // config.patch_size**2 >= 1  # at least one patch
            # the TripoSR paper: MSE + 2 LPIPS + 0.05 mask, no 3D loss
            assert (config.lambda_rgb, config.lambda_lpips, config.lambda_mask) == (1, 2, 0.05)
            assert config.lambda_occupancy == 0 and config.grad_checkpointing
    cuda = TrainConfig(**official.train_settings("cuda"))
    assert cuda.patch_size == 128 and cuda.mixed_precision == "auto"  # bf16 autocast on CUDA
    assert official.mesh_resolution == 256


def test_every_setting_shown_has_a_reason_and_both_profiles_a_value():
    for profile in recipes.PROFILES.values():
        for device in ("cpu", "cuda"):
            rows = recipes.comparison_rows(profile, device)
            assert {"size", "lr", "patch_size", "mesh_resolution"} <= {r["setting"] for r in rows}
            for row in rows:
                assert row[f"why ({profile.name})"], f"{profile.name}: {row['setting']} has no why"
                assert all(row[name] for name in recipes.PROFILES)


def test_profiles_never_share_a_dataset_folder():
    folders = [p.data_folder(smoke) for p in recipes.PROFILES.values() for smoke in (False, True)]
    assert len(set(folders)) == len(folders)


def fake_dataset(root: Path, size: int, n_views: int, occupancy_points: int) -> Path:
    """The two files ensure_dataset reads, as prepare_dataset writes them."""
    root.mkdir(parents=True)
    (root / "split.json").write_text(json.dumps({"train": [], "val": [], "test": []}))
    settings = {"size": size, "n_views": n_views, "occupancy_points": occupancy_points}
    (root / "dataset.json").write_text(json.dumps({"settings": settings, "seed": 1}))
    return root


def test_a_dataset_of_one_profile_is_refused_by_another(tmp_path):
    classroom = recipes.CLASSROOM.dataset
    root = fake_dataset(tmp_path / "parts", classroom["size"], classroom["n_views"], 2048)
    assert setup.ensure_dataset(root, recipes.CLASSROOM) == root
    with pytest.raises(ValueError, match=re.escape("size 128 (needs 512)")) as refused:
        setup.ensure_dataset(root, recipes.OFFICIAL)
    assert "'official'" in str(refused.value) and "data/parts-official" in str(refused.value)
    smoke = fake_dataset(tmp_path / "smoke", 64, 4, 256)  # the classroom's CI set
    with pytest.raises(ValueError, match=re.escape("occupancy_points 256 (needs 0)")):
        setup.ensure_dataset(smoke, recipes.OFFICIAL, smoke=True)
