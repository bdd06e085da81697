"""pretrain.py: the one command that makes the classroom model, at toy sizes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from tsr.cameras import CAMERA_DISTANCE, FOVY_DEG
from tsr.model import TSR
from utils.training.pretraining import CLASSROOM_CONFIG, init_for_pretraining, pretraining_model

REPO = Path(__file__).resolve().parents[1]


def test_init_makes_image_positions_loud_and_cross_attention_sharp():
    plain = TSR.from_config(CLASSROOM_CONFIG, seed=0)
    changed = TSR.from_config(CLASSROOM_CONFIG, seed=0)
    init_for_pretraining(changed, cross_attention_gain=4.0, position_std=1.0, geometric_heads=0)
    positions = changed.image_tokenizer.model.embeddings.position_embeddings
    assert 0.9 < float(positions.detach().std()) < 1.1
    for before, after in zip(
        plain.backbone.transformer_blocks, changed.backbone.transformer_blocks, strict=True
    ):
        for name in ("to_q", "to_k"):
            torch.testing.assert_close(
                getattr(after.attn2, name).weight, 4 * getattr(before.attn2, name).weight
            )
        torch.testing.assert_close(after.attn2.to_v.weight, before.attn2.to_v.weight)
        torch.testing.assert_close(after.attn1.to_q.weight, before.attn1.to_q.weight)


def test_pretraining_init_follows_the_seed_alone():
    """Each training process builds the model itself: the init must not depend on torch's
    global generator, which torch seeds from the OS in every process."""

    def init(seed: int, global_seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(global_seed)
        return pretraining_model(seed, 4.0, 1.0, 2, 3.0).state_dict()  # pretrain.py's defaults

    first, again, other = init(0, 1), init(0, 2), init(1, 1)
    assert all(torch.equal(first[key], again[key]) for key in first)
    key = "image_tokenizer.model.embeddings.position_embeddings"
    assert not torch.equal(first[key], other[key])


def _cross_attention_maps(model: TSR, image: torch.Tensor) -> list[torch.Tensor]:
    """Softmax attention of every cross-attention block -> [(heads, triplane tokens, patches)]."""
    inputs = []
    hooks = [
        block.attn2.register_forward_pre_hook(lambda module, args: inputs.append((module, args)))
        for block in model.backbone.transformer_blocks
    ]
    with torch.no_grad():
        model.encode(image)
        maps = []
        for module, (hidden, context) in inputs:
            q = module.to_q(hidden)[0].unflatten(-1, (module.heads, -1)).transpose(0, 1)
            k = module.to_k(context)[0].unflatten(-1, (module.heads, -1)).transpose(0, 1)
            maps.append(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1))
    for hook in hooks:
        hook.remove()
    return maps


def _mass_on_own_patch(attention: torch.Tensor, plane_size: int, grid: int) -> torch.Tensor:
    """Per head: mean attention of (y, z)-plane cells on the 3x3 patches around the patch the
    cell's centre projects to in the input view. attention (heads, 3*P*P, 1 + g*g) -> (heads,)"""
    centres = 0.87 * ((2 * torch.arange(plane_size) + 1) / plane_size - 1)  # world y or z
    to_image = 1 / (math.tan(math.radians(FOVY_DEG) / 2) * CAMERA_DISTANCE)
    column = ((centres * to_image + 1) / 2 * grid).floor().clamp(0, grid - 1).long()
    row = ((-centres * to_image + 1) / 2 * grid).floor().clamp(0, grid - 1).long()  # +z is up
    patches = attention[:, 2 * plane_size**2 :, 1:].unflatten(-1, (grid, grid))  # (y,z) plane
    mass = torch.zeros(attention.shape[0])
    for h in range(plane_size):  # plane rows follow z, columns y
        for w in range(plane_size):
            r, c = int(row[h]), int(column[w])
            cell = patches[:, h * plane_size + w]
            mass += cell[:, max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2].sum((-1, -2))
    return mass / plane_size**2


def test_geometric_heads_look_up_the_patch_each_triplane_cell_projects_to():
    plain = TSR.from_config(CLASSROOM_CONFIG, seed=0)
    init_for_pretraining(plain, cross_attention_gain=4.0, position_std=1.0, geometric_heads=0)
    geometric = TSR.from_config(CLASSROOM_CONFIG, seed=0)
    init_for_pretraining(geometric, cross_attention_gain=4.0, position_std=1.0, geometric_heads=2)
    size = plain.config.cond_image_size
    image = torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(0))
    plane_size = plain.tokenizer.plane_size
    grid = size // plain.config.image_tokenizer.vit["patch_size"]  # patches per side
    uniform = 9 / grid**2  # 3x3 of the patches
    for before, after in zip(
        _cross_attention_maps(plain, image), _cross_attention_maps(geometric, image), strict=True
    ):
        plain_mass = _mass_on_own_patch(before, plane_size, grid)
        geometric_mass = _mass_on_own_patch(after, plane_size, grid)
        assert (plain_mass < 2 * uniform).all(), plain_mass  # random init: no idea where to look
        assert (geometric_mass[:2] > 2.5 * uniform).all(), geometric_mass
    for before, after in zip(
        plain.backbone.transformer_blocks, geometric.backbone.transformer_blocks, strict=True
    ):  # the other heads keep their content-based query weights
        head_dim = before.attn2.to_q.weight.shape[0] // before.attn2.heads
        rows = slice(2 * head_dim, None)
        torch.testing.assert_close(after.attn2.to_q.weight[rows], before.attn2.to_q.weight[rows])


def test_one_command_builds_data_trains_and_ships_a_loadable_model(tmp_path):
    command = [
        sys.executable, str(REPO / "pretrain.py"), "--objects", "10", "--views", "2",
        "--size", "32", "--occupancy-points", "64", "--steps", "2", "--batch-size", "2",
        "--rays", "64", "--out", "model", "--workers", "1",
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    folder = tmp_path / "model"
    assert {"config.yaml", "model.safetensors", "recipe.json", "loss.png"} <= {
        path.name for path in folder.iterdir()
    }
    recipe = json.loads((folder / "recipe.json").read_text())
    assert recipe["steps"] == 2 and recipe["data"]["n_objects"] == 10
    assert recipe["arguments"]["seed"] == 0  # data, init and training seed
    model = TSR.from_pretrained(folder)
    assert model.config.mc_threshold == recipe["mc_threshold"]
    assert (tmp_path / "outputs" / "pretrain-model" / "metrics.jsonl").is_file()

    # interrupted? --resume continues from the last checkpoint and keeps the built data
    resumed = subprocess.run(
        [*command, "--steps", "3", "--resume"],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    recipe = json.loads((folder / "recipe.json").read_text())
    assert recipe["resumed"] and recipe["steps"] == 3 and recipe["data"]["already_built"] == 10
    records = (tmp_path / "outputs" / "pretrain-model" / "metrics.jsonl").read_text().splitlines()
    train_steps = [json.loads(r)["step"] for r in records if "lr" in json.loads(r)]
    assert train_steps == [1, 2, 3]  # steps 1-2 kept, only step 3 trained again


def test_colour_lookup_carries_the_input_colour_into_the_scene_code():
    model = TSR.from_config(CLASSROOM_CONFIG, seed=0)
    init_for_pretraining(
        model, cross_attention_gain=4.0, position_std=1.0, geometric_heads=2, colour_lookup=3.0
    )
    size = model.config.cond_image_size
    red = torch.full((1, size, size, 3), 0.5)
    red[:, size // 4 : -size // 4, size // 4 : -size // 4] = torch.tensor([0.9, 0.1, 0.1])
    blue = red.flip(-1)  # the same object, blue
    with torch.no_grad():
        red_code, blue_code = model.encode(red)[0], model.encode(blue)[0]  # (3, C, 2P, 2P)
    # the (y, z) plane faces the input camera: its central cells see the object
    quarter = red_code.shape[-1] // 4
    centre = (2, slice(-3, None), slice(quarter, -quarter), slice(quarter, -quarter))
    difference = (red_code[centre] - blue_code[centre]).mean((-1, -2))  # (3,) R, G, B channels
    assert difference[0] > 0.5 and difference[2] < -0.5, difference
    assert abs(float(difference[1])) < 0.25 * float(difference[0]), difference
