"""fine_tuning.py on the default (classroom) model: prepare -> fine-tune as subprocesses, then the variants
(resume, --full with patches, the course project's folder layout) through main()."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

from tsr.cameras import orbit_cameras, rays_from_c2w
from tsr.errors import UserInputError
from tsr.io import DEFAULT_MODEL
from tsr.model import TSR
from utils.data.course_layout import write_course_layout
from utils.data.dataset import read_object
from utils.training.adapters import load_adapter
from utils.training.config import TrainConfig
from utils.training.lora import lora_state_dict

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fine_tuning", REPO / "fine_tuning.py")
fine_tuning = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fine_tuning)
QUICK = ["--rays", "64", "--views", "3", "--val_objects", "1", "--val_rays_per_view", "64"]
QUICK += ["--progress", "false"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny model: a second thread only waits for a free core when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(*args) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, f"{args[0]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """prepare_data.py, then fine_tuning.py with the course flags and a few of ours."""
    tmp = tmp_path_factory.mktemp("cli")
    data = tmp / "data"
    run("prepare_data.py", "--out", data, "--family", "primitives", "--n", 6, "--views", 4,
        "--size", 32, "--workers", 1)  # fmt: skip
    output = run(
        "fine_tuning.py", "--input_folder", data, "--output_dir", tmp / "out", "--batch_size", 1,
        "--lr", 1e-3, "--epochs", 100, "--r", 4, "--alpha", 8, "--dropout", 0.05, "--device", "cpu",
        "--run_name", "first", "--max_steps", 3, "--val_every", 2, *QUICK,
        # the last weights, trained: 3 steps may well not beat step 0 on one validation object
        "--restore_best", "false",
    )  # fmt: skip
    return {"tmp": tmp, "data": data, "run": tmp / "out" / "first", "stdout": output}


def render(model: TSR, image: torch.Tensor) -> torch.Tensor:
    rays_o, rays_d = rays_from_c2w(orbit_cameras(1, 20.0), 8, 8, 40.0)
    with torch.no_grad():
        return model.render_rays(model.encode(image)[0], rays_o[0], rays_d[0])["rgb"]


def test_fine_tuning_writes_a_run_whose_adapter_loads(lora_run):
    run_dir = lora_run["run"]
    for name in ("config.json", "metrics.jsonl", "loss.png", "checkpoints/last.pt"):
        assert (run_dir / name).is_file(), name
    resolved = json.loads((run_dir / "config.json").read_text())
    assert (
        resolved["lr"] == 1e-3 and resolved["max_steps"] == 3 and resolved["rays_per_object"] == 64
    )
    blocks = TSR.from_pretrained(DEFAULT_MODEL).config.backbone.num_layers
    assert resolved["lora"]["n_targets"] == 8 * blocks  # attn: 8 Linear layers per block
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]
    assert steps == [0, 1, 2, 2, 3, 3]  # validation at 0, every 2 steps and at the end

    adapted = load_adapter(TSR.from_pretrained(DEFAULT_MODEL), run_dir / "adapter")
    assert any(v.abs().sum() > 0 for k, v in lora_state_dict(adapted).items() if "lora_B" in k)
    # the course-format copy where the course's inference looks is the same adapter
    course = load_adapter(
        TSR.from_pretrained(DEFAULT_MODEL), lora_run["tmp"] / "out" / "lora_weights.pth"
    )
    image = torch.rand(1, adapted.config.cond_image_size, adapted.config.cond_image_size, 3)
    base = render(TSR.from_pretrained(DEFAULT_MODEL), image)
    assert not torch.allclose(render(adapted, image), base)
    torch.testing.assert_close(render(course, image), render(adapted, image), atol=1e-5, rtol=0)


def test_resume_continues_the_newest_run(lora_run):
    out = lora_run["tmp"] / "out"
    fine_tuning.main([
        "--input_folder", str(lora_run["data"]), "--output_dir", str(out), "--r", "4",
        "--alpha", "8", "--lr", "1e-3", "--max_steps", "5", "--val_every", "0", "--resume", *QUICK,
    ])  # fmt: skip
    records = [json.loads(line) for line in (lora_run["run"] / "metrics.jsonl").open()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5]
    assert torch.load(lora_run["run"] / "checkpoints" / "last.pt", weights_only=True)["step"] == 5


def test_full_training_with_patches_saves_a_model(lora_run, tmp_path):
    run_dir = fine_tuning.main([
        "--input_folder", str(lora_run["data"]), "--output_dir", str(tmp_path), "--full",
        "--run_name", "full", "--max_steps", "2", "--patch", "8", "--views", "3",
        "--val_every", "0", "--progress", "false",
        # the last weights, trained: 2 steps may well not beat the base at step 0
        "--restore_best", "false",
    ])  # fmt: skip
    resolved = json.loads((run_dir / "config.json").read_text())
    assert (resolved["train_mode"], resolved["sampling"], resolved["patch_size"]) == (
        "full",
        "patches",
        8,
    )
    trained = TSR.from_pretrained(run_dir / "model")
    base = TSR.from_pretrained(DEFAULT_MODEL)
    assert not torch.equal(trained.decoder.layers[0].weight, base.decoder.layers[0].weight)
    assert not (tmp_path / "lora_weights.pth").exists()  # no adapter in full mode


def test_course_layout_input(lora_run, tmp_path):
    course = tmp_path / "course"
    for object_dir in sorted(p for p in lora_run["data"].iterdir() if p.is_dir())[:2]:
        views = read_object(object_dir)
        write_course_layout(
            course / object_dir.name, views["rgba"], views["depth"], views["c2w"], views["fovy_deg"]
        )
    run_dir = fine_tuning.main([
        "--input_folder", str(course), "--output_dir", str(tmp_path / "out"), "--r", "4",
        "--alpha", "4", "--run_name", "course", "--max_steps", "2", *QUICK,
    ])  # fmt: skip
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run_dir / "config.json").read_text())["n_train_objects"] == 2


def test_every_generated_flag_parses_to_its_fields_type():
    """--occupancy_level 3.0 once arrived as the string '3.0' (a None default became str)."""
    hints = typing.get_type_hints(TrainConfig)
    samples = {int: ("3", 3), float: ("3.0", 3.0), str: ("x", "x"), bool: ("false", False)}
    for field in dataclasses.fields(TrainConfig):
        if field.name in fine_tuning.MAPPED_FIELDS:
            continue
        kind = next((a for a in typing.get_args(hints[field.name]) if a is not type(None)), None)
        kind = kind or hints[field.name]
        text, value = samples[kind]
        args = fine_tuning.parse_args(["--input_folder", "d", f"--{field.name}", text])
        parsed = getattr(args, field.name)
        assert type(parsed) is kind and parsed == value, (field.name, parsed)


@pytest.mark.parametrize("text", ["ture", "2", ""])
def test_boolean_flags_refuse_what_is_not_a_boolean(text, capsys):
    with pytest.raises(SystemExit) as exit_info:
        fine_tuning.parse_args(["--input_folder", "d", "--restore_best", text])
    assert exit_info.value.code == 2 and "--restore_best" in capsys.readouterr().err


def test_unknown_input_folder_says_what_to_do(tmp_path):
    with pytest.raises(UserInputError, match=r"prepare_data\.py"):
        fine_tuning.main(["--input_folder", str(tmp_path), "--output_dir", str(tmp_path / "o")])


def test_chain_prepare_finetune_infer_evaluate(lora_run):
    """The four CLIs as a user runs them, each on the previous one's output."""
    adapter, tmp = lora_run["run"] / "adapter", lora_run["tmp"]
    object_dir = sorted(p for p in lora_run["data"].iterdir() if p.is_dir())[0]
    mesh_path = tmp / "mesh_lora.obj"
    run("inference_lora.py", "--image_path", object_dir / "rgba" / "000.png",
        "--lora_path", adapter, "--output", mesh_path, "--mc-resolution", 24,
        "--threshold", 0.4, "--no-remove-bg")  # fmt: skip
    assert mesh_path.is_file()
    run("evaluate.py", "--data", lora_run["data"], "--split", "all", "--adapter", adapter,
        "--output-dir", tmp / "eval", "--mc-resolution", 24, "--threshold", 0.4,
        "--n-points", 500, "--max-objects", 1)  # fmt: skip
    summary = json.loads((tmp / "eval" / "metrics.json").read_text())
    assert {"base", "lora"} <= set(summary["models"])
    assert (tmp / "eval" / "metrics.md").is_file()
