"""The notebooks as files (clean, one settings cell, prose before short code) and the helpers
they share (utils/notebook/); the runner behind `make demo` has test_run_notebooks.py. The
notebooks themselves run in tests/test_executed_notebooks.py, which also reads what they show."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
import trimesh

from tsr.model import TSR
from utils.data.dataset import read_object
from utils.evaluation.threshold import choose_threshold
from utils.notebook import measuring, previews, setup, tables
from utils.training import adapters, lora, recipes

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
EXPECTED = ["00_environment", "01_dataset", "02_lora_injection", "03_training",
            "04_mesh_extraction", "05_evaluation"]  # fmt: skip
SETTINGS = {"MODEL", "DATA", "DEVICE", "SMOKE", "PROFILE"}
MAX_CODE_LINES = 8  # non-blank lines of any code cell but the settings cell


def code_of(cell) -> str:
    """Cell source without IPython magics, so ast can parse it."""
    return "\n".join(line for line in cell.source.splitlines() if not line.startswith("%"))


def assigned_names(source: str) -> dict[str, ast.expr]:
    """Top-level `NAME = value` and `A, B = x, y` assignments of a cell."""
    names = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    names[target.id] = node.value
                elif isinstance(target, ast.Tuple):
                    names |= {t.id: node.value for t in target.elts if isinstance(t, ast.Name)}
    return names


def test_the_six_numbered_notebooks_are_there():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_carries_no_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {index} has outputs: clear them"
            assert cell.execution_count is None, f"{path.name} cell {index} has a count"
    assert "widgets" not in notebook.metadata, f"{path.name} stores widget state"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_opens_with_a_title_and_one_settings_cell(path):
    cells = nbformat.read(path, as_version=4).cells
    assert cells[0].cell_type == "markdown" and cells[0].source.startswith(f"# {path.stem[:2]} ")
    assert "You will learn" in cells[0].source
    settings_cell = next(cell for cell in cells if cell.cell_type == "code")
    names = assigned_names(code_of(settings_cell))
    assert SETTINGS <= set(names), f"{path.name}: the first code cell lacks {SETTINGS - set(names)}"
    assert ast.unparse(names["SMOKE"]) == "os.environ.get('SMOKE') == '1'"
    # the default model is tsr.io's; WORKBOOK_MODEL points every notebook elsewhere at once
    assert ast.unparse(names["MODEL"]) == "os.environ.get('WORKBOOK_MODEL', DEFAULT_MODEL)"
    assert ast.unparse(names["PROFILE"]) == "recipes.profile_for(MODEL, DEVICE)"
    assert ast.unparse(names["DATA"]) == "PROFILE.data_folder(SMOKE)", "the profile's dataset"
    assert "torch.cuda.is_available()" in ast.unparse(names["DEVICE"])
    later = [assigned_names(code_of(c)) for c in cells if c.cell_type == "code"][1:]
    redefined = [name for names in later for name in names if name in SETTINGS]
    assert not redefined, f"{path.name} sets {redefined} outside its settings cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_code_cell_is_short_and_follows_prose(path):
    cells = nbformat.read(path, as_version=4).cells
    code_cells = [i for i, cell in enumerate(cells) if cell.cell_type == "code"]
    for index in code_cells:
        assert cells[index - 1].cell_type == "markdown", f"{path.name} cell {index}: no prose"
        lines = [line for line in cells[index].source.splitlines() if line.strip()]
        limit = 20 if index == code_cells[0] else MAX_CODE_LINES
        assert len(lines) <= limit, f"{path.name} cell {index}: {len(lines)} lines > {limit}"


# ---- utils/notebook/ -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory) -> Path:
    return setup.ensure_dataset(tmp_path_factory.mktemp("data") / "smoke", recipes.CLASSROOM, True)


@pytest.fixture(scope="module")
def tiny() -> TSR:
    return TSR.from_config("tiny", seed=0)


def test_repo_root_is_found_from_the_notebooks_folder(monkeypatch):
    monkeypatch.chdir(REPO / "notebooks")
    assert setup.repo_root() == REPO


def test_repo_root_of_a_notebook_copied_elsewhere_is_the_installed_one(monkeypatch, tmp_path):
    """A notebook opened outside the repository (a copy, JupyterLab served from elsewhere)
    finds the repository this package lives in."""
    monkeypatch.chdir(tmp_path)
    assert setup.repo_root() == REPO


def test_peak_memory_sees_a_temporary_allocation():
    with measuring.peak_memory("cpu") as memory:
        block = np.ones(100 * 2**20 // 8)  # 100 MB, touched
        del block
    assert 90 <= memory["peak_mb"] < 400, memory
    assert memory["how"]


def test_choose_threshold_keeps_the_models_level_when_the_field_crosses_it(tiny):
    code = torch.randn(1, 3, 8, 16, 16)
    quantile = choose_threshold(tiny, code, quantile=0.5)  # 25 is far above this field
    assert quantile < tiny.config.mc_threshold
    original = tiny.config.mc_threshold
    try:
        tiny.config.mc_threshold = quantile
        assert choose_threshold(tiny, code) == quantile
    finally:
        tiny.config.mc_threshold = original


def test_mesh_extraction_benchmark_records_each_case(tiny):
    code = torch.randn(3, 8, 16, 16)
    threshold = choose_threshold(tiny, code[None])
    renderer_chunk = tiny.renderer.chunk_size
    records = measuring.mesh_extraction_benchmark(tiny, code, threshold, (8, 16), (64, 4096))
    assert [(r["resolution"], r["chunk_size"]) for r in records] == [
        (8, 64), (8, 4096), (16, 64), (16, 4096)
    ]  # fmt: skip
    for record in records:
        assert record["n_queries"] == record["resolution"] ** 3  # dense queries every point
        assert record["n_faces"] > 0 and record["seconds"] > 0 and record["peak_memory_mb"] >= 0
        assert set(measuring.BENCHMARK_COLUMNS) <= set(record)
    assert records[0]["n_faces"] == records[1]["n_faces"]  # chunking never changes the mesh
    assert tiny.renderer.chunk_size == renderer_chunk  # restored


def test_depth_points_lie_on_the_ground_truth_surface(smoke_data):
    object_dir = next(p for p in sorted(smoke_data.iterdir()) if (p / "meta.json").exists())
    views = read_object(object_dir)
    points = previews.depth_points(views, 1)
    _, distance, _ = trimesh.load(object_dir / "mesh.glb", force="mesh").nearest.on_surface(points)
    assert len(points) > 50 and np.median(distance) < 0.02


def test_split_counts_add_up(smoke_data):
    from utils.data.statistics import dataset_statistics

    rows = tables.split_counts(dataset_statistics(smoke_data))
    assert [row["split"] for row in rows] == ["train", "val", "test"]
    assert sum(row["total"] for row in rows) == recipes.CLASSROOM.smoke_dataset["n_objects"]
    families = recipes.CLASSROOM.smoke_dataset["families"]
    assert all(row["total"] == sum(row[family] for family in families) for row in rows)


def test_gradient_norms_tell_lora_a_from_b(tiny):
    model = lora.add_lora(TSR.from_config("tiny", seed=0), r=4, alpha=4)
    image = torch.rand(1, model.config.cond_image_size, model.config.cond_image_size, 3)
    model.encode(image).square().mean().backward()
    rows = {row["parameters"]: row for row in previews.gradient_norms(model)}
    assert rows["base weights"]["with a gradient"] == 0
    assert rows["lora_A"]["gradient norm"] == 0.0  # B = 0 at initialisation blocks A's gradient
    assert rows["lora_B"]["gradient norm"] > 0.0


def test_previews_keep_the_first_validation_and_amplify_the_change_since_it(tiny, smoke_data):
    from utils.data.dataset import MultiViewDataset

    model = TSR.from_config("tiny", seed=0)
    val = MultiViewDataset(smoke_data, "val", 2, cond_size=model.config.cond_image_size)
    preview = previews.PreviewCallback(model, val, size=16, max_rows=4)
    shown = []
    for step in (0, 50, 100, 150, 200):
        preview.on_validation(step, {"val_loss": 1.0})
        shown.append([step for step, _ in preview.shown()])
        with torch.no_grad():  # a different model at every validation
            model.decoder.layers[-1].bias.add_(0.05 * (step + 50) / 50)
    # Every validation while they fit, then step 0 and the latest: step 0 is never dropped.
    assert shown == [[0], [0, 50], [0, 50, 100], [0, 50, 100, 150], [0, 100, 150, 200]]
    figure = preview.figure()
    axes = np.array(figure.axes).reshape(4, 4)
    assert [ax.get_ylabel() for ax in axes[:, 0]] == ["step 0", "step 100", "step 150", "step 200"]
    assert len(axes[0, 3].images) == 0  # no change to show for the first row
    first = preview.shown()[0][1]
    changes = [np.abs(p - first).mean(axis=-1) for _, p in preview.shown()[1:]]  # by hand
    gain = 1.0 / max(change.max() for change in changes)
    drawn = np.asarray(axes[3, 3].images[0].get_array())
    np.testing.assert_allclose(drawn, 1.0 - np.clip(changes[-1] * gain, 0, 1), atol=1e-6)
    assert axes[0, 3].get_title() == f"change since step 0 (x{gain:.0f})"
    assert axes[3, 3].images[0].get_clim() == (0.0, 1.0)  # grey levels are not stretched


def test_lora_settings_compared_from_one_start(tmp_path, smoke_data):
    from utils.data.dataset import MultiViewDataset
    from utils.training.config import TrainConfig

    size = TSR.from_config("tiny", seed=0).config.cond_image_size
    train = MultiViewDataset(smoke_data, "train", 2, cond_size=size)
    val = MultiViewDataset(smoke_data, "val", 2, cond_size=size)
    variants = {"r=2": {"r": 2, "alpha": 2}, "r=4 cross": {"r": 4, "alpha": 8, "targets": "cross"}}
    config = TrainConfig(max_steps=2, batch_size=1, rays_per_object=64, val_objects=1, val_every=1,
                         early_stopping_patience=1, progress=False)  # fmt: skip
    rows = measuring.compare_lora_settings("tiny", train, val, variants, config, "cpu", tmp_path)
    assert [row["variant"] for row in rows] == list(variants)
    assert all(row["steps"] == 2 for row in rows)  # no early stop: every variant runs as long
    # LoRA is a no-op at step 0 (B = 0): every variant starts from the base model's numbers.
    assert rows[0]["val_loss at 0"] == rows[1]["val_loss at 0"]
    assert rows[0]["val_psnr at 0"] == rows[1]["val_psnr at 0"]
    for row in rows:  # the changes, by hand
        assert row["PSNR gain (dB)"] == pytest.approx(row["val_psnr"] - row["val_psnr at 0"])
        assert row["val_loss change %"] == pytest.approx(
            100 * (row["val_loss"] - row["val_loss at 0"]) / row["val_loss at 0"]
        )
    # Trainable parameters, by hand: r (d_in + d_out) per wrapped layer.
    model = TSR.from_config("tiny", seed=0)
    layers = {
        "r=2": lora.resolve_targets(model, "attn"),
        "r=4 cross": lora.resolve_targets(model, "cross"),
    }
    for row, r in zip(rows, (2, 4), strict=True):
        shapes = [model.get_submodule(name) for name in layers[row["variant"]]]
        assert row["trainable"] == sum(r * (m.in_features + m.out_features) for m in shapes)
    assert (tmp_path / "r=2" / "adapter").is_dir()
    logged = [json.loads(line) for line in (tmp_path / "r=2" / "metrics.jsonl").open()]
    assert [r["step"] for r in logged if "val_loss" in r] == [0, 2]  # validated at both ends only
    # the notebook run again: the throwaway runs are replaced, with the same numbers
    again = measuring.compare_lora_settings("tiny", train, val, variants, config, "cpu", tmp_path)
    assert [row["val_loss"] for row in again] == [row["val_loss"] for row in rows]


def test_ensure_adapter_reuses_a_matching_adapter_and_replaces_another(tmp_path, smoke_data):
    run_dir = tmp_path / "run"
    first = setup.ensure_adapter("tiny", smoke_data, run_dir, smoke=True, steps=1)
    stamp = (first / adapters.ADAPTER_WEIGHTS).stat().st_mtime_ns
    assert setup.ensure_adapter("tiny", smoke_data, run_dir, smoke=True, steps=1) == first
    assert (first / adapters.ADAPTER_WEIGHTS).stat().st_mtime_ns == stamp  # not retrained
    metadata = json.loads((first / adapters.TSR_METADATA).read_text())
    metadata["base_fingerprint"] = "other weights"
    (first / adapters.TSR_METADATA).write_text(json.dumps(metadata))
    again = setup.ensure_adapter("tiny", smoke_data, run_dir, smoke=True, steps=1)
    assert (
        json.loads((again / adapters.TSR_METADATA).read_text())["base_fingerprint"]
        != "other weights"
    )


def test_the_most_changed_object_skips_nothing_but_empty_meshes():
    chamfer = {"base": [0.1, math.nan, 0.3], "LoRA": [0.12, 0.05, 0.2]}  # NaN: an empty mesh
    records = {
        model: [{"object_id": f"o{i}", "chamfer_l1": v} for i, v in enumerate(values)]
        for model, values in chamfer.items()
    }
    assert tables.most_changed(records, "chamfer_l1", "base", "LoRA") == 2


def test_export_meshes_writes_every_format(tmp_path):
    rows = previews.export_meshes({"box": trimesh.creation.box()}, tmp_path, ("obj", "glb"))
    assert [Path(row["path"]).name for row in rows] == ["box.obj", "box.glb"]
    assert len(trimesh.load(tmp_path / "box.glb", force="mesh").faces) == 12
