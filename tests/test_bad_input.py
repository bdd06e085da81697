"""Bad input gets a named error and loses nothing: one case per class of failure a review
found (raw crashes, silently wrong results, lost data), on the tiny model and a 4-object set.

Every refusal case runs the CLI's `main` in-process through `run_cli` (starting Python costs
seconds here) and checks: exit status 2, one `error: <what> (<where>): <fix>` line naming the
input, no traceback, and not one byte changed in the inputs or the existing run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image
from safetensors.torch import load_file, save_file

from tsr import files
from tsr.__main__ import main as tsr_main
from tsr.errors import DiskFullError, UserInputError, run_cli
from tsr.io import SHIPPED_MODELS
from tsr.model import TSR
from tsr.preprocess import load_image, prepare_images
from utils.data.build import prepare_dataset
from utils.data.course_layout import write_course_layout
from utils.data.dataset import MultiViewDataset, read_object
from utils.training.config import TrainConfig
from utils.training.lora import add_lora
from utils.training.train import fit

REPO = Path(__file__).resolve().parents[1]
MAINS = {
    name: runpy.run_path(str(REPO / f"{name}.py"))["main"]
    for name in ("prepare_data", "fine_tuning", "evaluate", "inference_lora", "pretrain")
}
MAINS["tsr"] = tsr_main
QUICK = ["--pretrained", "tiny", "--max_steps", "1", "--rays", "32", "--views", "2",
         "--val_every", "0", "--progress", "false", "--r", "4", "--device", "cpu"]  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """A 4-object set and a finished one-step LoRA run on it (tiny model)."""
    tmp = tmp_path_factory.mktemp("bad_input")
    prepare_dataset(tmp / "data", families=("primitives",), n_objects=4, n_views=3, size=32,
                    workers=1)  # fmt: skip
    MAINS["fine_tuning"]([*QUICK, "--input_folder", str(tmp / "data"),
                          "--output_dir", str(tmp / "runs"), "--run_name", "run"])  # fmt: skip
    return {"tmp": tmp, "data": tmp / "data", "run": tmp / "runs" / "run"}


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (temporaries included) -> its hash."""
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def copy_of(folder: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(folder, tmp / folder.name))


def trained_objects(data: Path) -> list[Path]:
    """The train and val objects: what fine_tuning.py reads and checks."""
    split = json.loads((data / "split.json").read_text())
    return [data / name for name in sorted(split["train"] + split["val"])]


# ---- the cases: (tmp, env) -> (tool, argv, what the message must name) ----------------
CASES = {}


def case(function):
    CASES[function.__name__] = function
    return function


@case
def prepare_no_views(tmp, env):
    return "prepare_data", ["--out", str(tmp / "set"), "--views", "0"], ["--views"]


@case
def prepare_zero_size(tmp, env):
    return "prepare_data", ["--out", str(tmp / "set"), "--size", "0"], ["--size"]


@case
def prepare_zero_workers(tmp, env):
    return "prepare_data", ["--out", str(tmp / "set"), "--workers", "0"], ["--workers"]


@case
def finetune_zero_batch(tmp, env):
    return (
        "fine_tuning",
        [*QUICK, "--input_folder", str(env["data"]), "--batch_size", "0"],
        ["--batch_size"],
    )


@case
def finetune_negative_lr(tmp, env):
    return "fine_tuning", [*QUICK, "--input_folder", str(env["data"]), "--lr=-1e-3"], ["--lr"]


@case
def finetune_not_a_boolean(tmp, env):
    argv = [*QUICK, "--input_folder", str(env["data"]), "--restore_best", "ture"]
    return "fine_tuning", argv, ["--restore_best", "ture"]


@case
def finetune_rays_zero_without_3d_loss(tmp, env):
    argv = [*QUICK, "--input_folder", str(env["data"]), "--rays", "0"]
    return "fine_tuning", argv, ["--rays", "lambda_occupancy"]


@case
def finetune_dropout_one(tmp, env):
    return (
        "fine_tuning",
        [*QUICK, "--input_folder", str(env["data"]), "--dropout", "1"],
        ["--dropout"],
    )


@case
def finetune_run_name_outside(tmp, env):
    argv = [*QUICK, "--input_folder", str(env["data"]), "--run_name", "../elsewhere"]
    return "fine_tuning", argv, ["--run_name"]


@case
def finetune_missing_gpu(tmp, env):
    argv = [*QUICK[:-2], "--device", "cuda:7", "--input_folder", str(env["data"])]
    return "fine_tuning", argv, ["--device", "cuda:7"]


@case
def finetune_missing_input(tmp, env):
    return "fine_tuning", [*QUICK, "--input_folder", str(tmp / "nowhere")], ["nowhere"]


@case
def finetune_reuses_a_run_name(tmp, env):
    argv = [*QUICK, "--input_folder", str(env["data"]), "--output_dir", str(env["run"].parent),
            "--run_name", "run"]  # fmt: skip
    return "fine_tuning", argv, [str(env["run"]), "--overwrite"]


@case
def resume_with_another_lr(tmp, env):
    argv = [*QUICK, "--input_folder", str(env["data"]), "--resume", str(env["run"]),
            "--lr", "1e-2", "--max_steps", "2"]  # fmt: skip
    return "fine_tuning", argv, ["last.pt", "lr 0.0001 -> 0.01"]


@case
def resume_with_another_rank(tmp, env):
    argv = [*QUICK, "--input_folder", str(env["data"]), "--resume", str(env["run"]), "--r", "8"]
    return "fine_tuning", argv, ["last.pt", "r 4 -> 8"]


@case
def resume_with_other_views(tmp, env):
    argv = [*QUICK, "--input_folder", str(env["data"]), "--resume", str(env["run"]), "--views", "3"]
    return "fine_tuning", argv, ["last.pt", "supervision_views 2 -> 3"]


@case
def resume_on_another_base_model(tmp, env):
    argv = [*QUICK, "--input_folder", str(env["data"]), "--resume", str(env["run"]),
            "--pretrained", "classroom"]  # fmt: skip
    return "fine_tuning", argv, ["last.pt", "base_model 'tiny' -> 'classroom'"]


@case
def resume_on_other_data(tmp, env):
    data = copy_of(env["data"], tmp)
    split = json.loads((data / "split.json").read_text())
    split["train"] = split["train"][1:]  # one training object fewer
    (data / "split.json").write_text(json.dumps(split))
    argv = [*QUICK, "--input_folder", str(data), "--resume", str(env["run"])]
    return "fine_tuning", argv, ["last.pt", "train_objects '", "objects, ids sha256"]


@case
def resume_from_random_bytes(tmp, env):
    run = copy_of(env["run"], tmp)
    (run / "checkpoints" / "last.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    argv = [*QUICK, "--input_folder", str(env["data"]), "--resume", str(run)]
    return "fine_tuning", argv, [str(run / "checkpoints" / "last.pt"), "not a readable checkpoint"]


@case
def dataset_with_missing_files(tmp, env):
    """Two problems in two objects: both reported at once."""
    data = copy_of(env["data"], tmp)
    first, second = trained_objects(data)[:2]
    (first / "cameras.json").unlink()
    (second / "rgba" / "001.png").unlink()
    argv = [*QUICK, "--input_folder", str(data)]
    return "fine_tuning", argv, [str(first / "cameras.json"), str(second / "rgba" / "001.png")]


@case
def cameras_without_field_of_view(tmp, env):
    data = copy_of(env["data"], tmp)
    cameras_path = sorted(data.glob("*/cameras.json"))[0]
    cameras = json.loads(cameras_path.read_text())
    del cameras["fovy_deg"]
    cameras_path.write_text(json.dumps(cameras))
    return (
        "evaluate",
        ["--data", str(data), "--split", "all", "--pretrained", "tiny"],
        [str(cameras_path), "fovy_deg"],
    )


@case
def split_lists_a_missing_object(tmp, env):
    data = copy_of(env["data"], tmp)
    split = json.loads((data / "split.json").read_text())
    split["train"].append("ghost")
    (data / "split.json").write_text(json.dumps(split))
    return "fine_tuning", [*QUICK, "--input_folder", str(data)], [str(data / "ghost")]


@case
def depth_of_another_size(tmp, env):
    data = copy_of(env["data"], tmp)
    depth = trained_objects(data)[0] / "depth" / "001.npy"
    np.save(depth, np.zeros((16, 16), np.float32))
    return "fine_tuning", [*QUICK, "--input_folder", str(data), "--views", "3"], [str(depth)]


def course_object(env, tmp) -> Path:
    source = sorted(p for p in env["data"].iterdir() if p.is_dir())[0]
    views = read_object(source)
    folder = tmp / "course" / source.name
    write_course_layout(folder, views["rgba"], views["depth"], views["c2w"], views["fovy_deg"])
    return folder


@case
def course_layout_sizes_differ(tmp, env):
    folder = course_object(env, tmp)
    Image.new("L", (16, 16), 255).save(folder / "MASK" / "001.png")
    return (
        "fine_tuning",
        [*QUICK, "--input_folder", str(folder.parent)],
        [str(folder / "MASK" / "001.png")],
    )


@case
def course_layout_without_intrinsics(tmp, env):
    folder = course_object(env, tmp)
    cams = json.loads((folder / "cams.json").read_text())
    for view in cams["views"]:
        del view["K"]
    (folder / "cams.json").write_text(json.dumps(cams))
    argv = [*QUICK, "--input_folder", str(folder.parent)]
    return "fine_tuning", argv, [str(folder / "cams.json"), "no K"]


@case
def config_yaml_syntax_error(tmp, env):
    model = copy_of(SHIPPED_MODELS["tiny"], tmp)
    (model / "config.yaml").write_text("cond_image_size: [64\n  : oops\n")
    argv = [str(REPO / "examples" / "sphere.png"), "--pretrained", str(model), "--no-remove-bg",
            "--output-dir", str(tmp / "out"), "--device", "cpu"]  # fmt: skip
    return "tsr", argv, [str(model / "config.yaml"), "line 2"]


@case
def weights_with_nan(tmp, env):
    model = copy_of(SHIPPED_MODELS["tiny"], tmp)
    state = torch.load(model / "model.ckpt", weights_only=True)
    state["decoder.layers.0.weight"][0, 0] = float("nan")
    torch.save(state, model / "model.ckpt")
    argv = [str(REPO / "examples" / "sphere.png"), "--pretrained", str(model), "--no-remove-bg",
            "--output-dir", str(tmp / "out"), "--device", "cpu"]  # fmt: skip
    return "tsr", argv, [str(model / "model.ckpt"), "decoder.layers.0.weight"]


@case
def threshold_not_a_number(tmp, env):
    argv = [str(REPO / "examples" / "sphere.png"), "--threshold", "nan",
            "--output-dir", str(tmp / "out")]  # fmt: skip
    return "tsr", argv, ["--threshold", "nan"]


@case
def image_too_small(tmp, env):
    Image.new("RGB", (2, 2)).save(tmp / "dot.png")
    return "tsr", [str(tmp / "dot.png"), "--output-dir", str(tmp / "out")], [str(tmp / "dot.png")]


@case
def adapter_config_not_json(tmp, env):
    adapter = copy_of(env["run"] / "adapter", tmp)
    (adapter / "adapter_config.json").write_text('{"r": 4,')
    argv = ["--image_path", str(REPO / "examples" / "sphere.png"), "--lora_path", str(adapter),
            "--repo_root", "tiny", "--output", str(tmp / "mesh.obj"),
            "--device", "cpu"]  # fmt: skip
    return "inference_lora", argv, [str(adapter / "adapter_config.json")]


@case
def adapter_weights_with_inf(tmp, env):
    adapter = copy_of(env["run"] / "adapter", tmp)
    weights = adapter / "adapter_model.safetensors"
    state = load_file(weights)
    name = sorted(state)[0]
    state[name][0, 0] = float("inf")
    save_file(state, weights)
    argv = ["--image_path", str(REPO / "examples" / "sphere.png"), "--lora_path", str(adapter),
            "--repo_root", "tiny", "--output", str(tmp / "mesh.obj"),
            "--device", "cpu"]  # fmt: skip
    return "inference_lora", argv, [str(adapter), name.removeprefix("base_model.model.")]


@case
def evaluate_without_points(tmp, env):
    return "evaluate", ["--data", str(env["data"]), "--n-points", "0"], ["--n-points"]


@case
def pretrain_uneven_batch(tmp, env):
    argv = ["--batch-size", "3", "--processes", "2", "--out", str(tmp / "m"),
            "--data", str(tmp / "d")]  # fmt: skip
    return "pretrain", argv, ["--batch-size", "--processes"]


@case
def pretrain_over_a_model(tmp, env):
    model = copy_of(SHIPPED_MODELS["tiny"], tmp)
    (model / "config.yaml").touch()
    return "pretrain", ["--out", str(model), "--data", str(tmp / "d")], [str(model), "--overwrite"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_refused_naming_the_input_and_nothing_changes(name, env, tmp_path, capsys):
    tool, argv, named = CASES[name](tmp_path, env)
    before = {folder: snapshot(folder) for folder in (tmp_path, env["tmp"])}
    try:
        status = run_cli(MAINS[tool], argv)
    except SystemExit as exit:  # argparse refuses a flag itself
        status = exit.code
    error = capsys.readouterr().err
    assert status == 2 and "Traceback" not in error, error
    assert error.startswith("error: ") and "): " in error, error
    for text in named:
        assert text in error, f"{text!r} not in {error!r}"
    assert {folder: snapshot(folder) for folder in before} == before  # nothing written or lost


def test_a_traceback_only_when_debugging(tmp_path):
    """The one subprocess: what a user's shell sees, and what WORKBOOK_DEBUG=1 adds."""
    command = [sys.executable, "-m", "tsr", str(tmp_path / "nope.png")]
    quiet = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    assert quiet.stderr.startswith("error: ") and "nope.png" in quiet.stderr
    debug = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "WORKBOOK_DEBUG": "1"},
    )  # fmt: skip
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "nope.png" in debug.stderr


# ---- meshes that cannot make an object are skipped by name ---------------------------
def test_broken_meshes_are_skipped_by_name(tmp_path):
    meshes = tmp_path / "meshes"
    meshes.mkdir()
    (meshes / "nan.obj").write_text(
        "v 0 0 0\nv 1 0 0\nv 0 1 0\nv nan 0 1\nv 0 0 1\n"
        "f 1 2 3\nf 1 2 4\nf 1 3 4\nf 2 3 4\nf 1 2 5\n"
    )  # processing alone would drop the faces at the NaN and keep a one-triangle mesh
    (meshes / "flat.obj").write_text("v 0 0 0\nv 1 0 0\nv 2 0 0\nf 1 2 3\n")  # zero area
    trimesh.creation.box().export(meshes / "box.obj")
    summary = prepare_dataset(tmp_path / "set", input_folder=meshes, n_views=2, size=16,
                              workers=1)  # fmt: skip
    reasons = {row["file"]: row["reason"] for row in summary["skipped"]}
    assert "NaN" in reasons["nan.obj"] and "zero area" in reasons["flat.obj"]
    assert json.loads((tmp_path / "set" / "dataset.json").read_text())["objects"] == ["box"]


# ---- images are read as they look --------------------------------------------------------
ROWS, COLUMNS = np.mgrid[:64, :64]
DISC = (ROWS - 31.5) ** 2 + (COLUMNS - 31.5) ** 2 < 15**2  # (64, 64): True on a centred disc


def grey_background_and_object(image: Image.Image) -> tuple[float, float]:
    """What the model sees at a corner (background) and at the centre (the object)."""
    seen = prepare_images(image, 64)[0]
    return float(seen[0, 0].mean()), float(seen[32, 32].mean())


def save_modes(tmp: Path) -> dict[str, tuple[Path, float]]:
    """Images of a disc of known grey on a transparent or black background, in the modes a
    review found mishandled -> (file, the disc's grey in [0, 1])."""
    made = {}
    la = np.stack([np.full((64, 64), 200, np.uint8), DISC.astype(np.uint8) * 255], -1)
    Image.fromarray(la, "LA").save(tmp / "la.png")
    made["la"] = (tmp / "la.png", 200 / 255)
    palette = Image.fromarray(DISC.astype(np.uint8), "P")
    palette.putpalette([0, 0, 0, 200, 200, 200])
    palette.save(tmp / "p.png", transparency=0)
    made["p_transparent"] = (tmp / "p.png", 200 / 255)
    Image.fromarray((DISC * 52428).astype(np.uint16)).save(tmp / "grey16.png")  # I;16
    made["grey16"] = (tmp / "grey16.png", 0.8)
    Image.fromarray((DISC * 40000).astype(np.int32)).save(tmp / "int32.tif")  # I
    made["int32"] = (tmp / "int32.tif", 40000 / 65535)
    Image.fromarray((DISC * 0.25).astype(np.float32)).save(tmp / "float.tif")  # F
    made["float"] = (tmp / "float.tif", 0.25)
    rgb = np.repeat((DISC * 153).astype(np.uint8)[..., None], 3, -1)
    Image.fromarray(rgb).convert("CMYK").save(tmp / "cmyk.tif")
    made["cmyk"] = (tmp / "cmyk.tif", 0.6)
    return made


@pytest.mark.parametrize("mode", ["la", "p_transparent", "grey16", "int32", "float", "cmyk"])
def test_every_image_mode_is_read_as_it_looks(mode, tmp_path):
    path, grey = save_modes(tmp_path)[mode]
    image = load_image(path)
    corner, centre = grey_background_and_object(image)
    assert centre == pytest.approx(grey, abs=2 / 255)
    transparent = mode in ("la", "p_transparent")
    # transparency composites on TripoSR's grey, 0.5 (the alpha used to be dropped: black)
    assert corner == pytest.approx(0.5 if transparent else 0.0, abs=1 / 255)
    image.save(tmp_path / "saved.png")  # CMYK, I and F used to crash here


def test_exif_orientation_is_applied(tmp_path):
    left_red = np.zeros((40, 64, 3), np.uint8)
    left_red[:, :32, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to show
    Image.fromarray(left_red).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = np.asarray(load_image(tmp_path / "phone.jpg"))
    assert upright.shape == (64, 40, 3)  # portrait, as shown
    assert upright[:24, :, 0].mean() > 200 and upright[-24:, :, 0].mean() < 50  # red on top


def test_float_image_outside_the_unit_range_is_refused(tmp_path):
    Image.fromarray(np.full((16, 16), 3.5, np.float32)).save(tmp_path / "hdr.tif")
    with pytest.raises(UserInputError, match=r"hdr\.tif.*scale it"):
        load_image(tmp_path / "hdr.tif")


# ---- a full disk keeps the old file and says so ------------------------------------------
@pytest.mark.parametrize("failure", ["enospc", "buffered_writer"])
def test_disk_full_keeps_the_old_file(failure, tmp_path, monkeypatch):
    """ENOSPC, or a writer that loses the errno (torch.save: 'unexpected pos') on a disk with
    no space left: either way a DiskFullError naming the path, the old file intact."""
    path = tmp_path / "last.pt"
    path.write_bytes(b"the good checkpoint")

    def writer(temporary: Path) -> None:
        temporary.write_bytes(b"half a checkpo")
        if failure == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(files, "_free_bytes", lambda folder: 0)
        raise RuntimeError("unexpected pos 64 vs 0")

    with pytest.raises(DiskFullError, match=r"last\.pt") as raised:
        with files.atomic_path(path) as temporary:
            writer(temporary)
    assert str(raised.value).startswith("the disk is full")
    assert path.read_bytes() == b"the good checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left


def test_a_failed_append_leaves_the_log_as_it_was(tmp_path, monkeypatch):
    log = tmp_path / "metrics.jsonl"
    files.append_text(log, '{"step": 1}\n')

    def full(handle, data):
        os.ftruncate(handle, 100)  # as if part of the line went out
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "write", full)
    with pytest.raises(DiskFullError, match=r"metrics\.jsonl"):
        files.append_text(log, '{"step": 2}\n')
    monkeypatch.undo()
    assert log.read_text() == '{"step": 1}\n'


# ---- training stops on a non-finite loss with its message, reproducibly -------------------
def test_a_diverging_run_stops_with_the_message(env, tmp_path):
    """lr 1e10 blows the weights up at step 1; step 2's rendering is NaN, which the mask BCE
    met first and crashed on before nan_to_num; now the loop's own check stops it."""
    dataset = MultiViewDataset(env["data"], "train", 2, cond_size=64)
    model = add_lora(TSR.from_pretrained("tiny"), r=4, alpha=4)
    config = TrainConfig(lr=1e10, max_steps=5, rays_per_object=64, val_every=0, progress=False,
                         lambda_mask=1.0, warmup_fraction=0.0)  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* lower --lr"):
        fit(model, dataset, config, output_dir=tmp_path / "run")


def test_a_resume_takes_the_runs_settings_not_the_defaults(env):
    """A resumed run killed and continued with only --resume used to train on with the
    default --views (4, not the run's 2) and ended on another adapter than a straight run."""
    fine_tuning = runpy.run_path(str(REPO / "fine_tuning.py"))
    argv = ["--input_folder", str(env["data"]), "--resume", str(env["run"])]
    args = fine_tuning["build_parser"]().parse_args(argv)
    checkpoint = str(env["run"] / "checkpoints" / "last.pt")
    config, pretrained, lora, views = fine_tuning["settings_to_resume"](
        fine_tuning["build_parser"](), args, argv, checkpoint
    )
    assert (views, lora["r"], config.rays_per_object, config.max_steps) == (2, 4, 32, 1)
    assert pretrained == "tiny"  # the run's base model, not the default
    assert args.views == 4 and args.r == 16 and args.rays is None  # the defaults it ignores
    assert args.pretrained != "tiny"


def test_same_seed_same_adapter_bytes(env, tmp_path):
    """Two fresh runs with the same flags and --seed: identical adapter files (the LoRA init
    used to come from torch's OS-seeded generator); another seed: another adapter."""
    weights = []
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        MAINS["fine_tuning"]([*QUICK, "--input_folder", str(env["data"]), "--seed", seed,
                              "--output_dir", str(tmp_path), "--run_name", name])  # fmt: skip
        weights.append((tmp_path / name / "adapter" / "adapter_model.safetensors").read_bytes())
    assert weights[0] == weights[1] and weights[0] != weights[2]
