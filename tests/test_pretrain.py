"""pretrain.py: the one command that makes the classroom model, at toy sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tsr.model import TSR

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pretrain import CLASSROOM_CONFIG, init_for_pretraining  # noqa: E402


def test_init_makes_image_positions_loud_and_cross_attention_sharp():
    plain = TSR.from_config(CLASSROOM_CONFIG, seed=0)
    changed = TSR.from_config(CLASSROOM_CONFIG, seed=0)
    init_for_pretraining(changed, cross_attention_gain=4.0, position_std=1.0)
    positions = changed.image_tokenizer.model.embeddings.position_embeddings
    assert 0.9 < float(positions.std()) < 1.1
    for before, after in zip(
        plain.backbone.transformer_blocks, changed.backbone.transformer_blocks, strict=True
    ):
        for name in ("to_q", "to_k"):
            torch.testing.assert_close(
                getattr(after.attn2, name).weight, 4 * getattr(before.attn2, name).weight
            )
        torch.testing.assert_close(after.attn2.to_v.weight, before.attn2.to_v.weight)
        torch.testing.assert_close(after.attn1.to_q.weight, before.attn1.to_q.weight)


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
