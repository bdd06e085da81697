"""The notebooks as files (clean, one settings cell, prose before short code), the helpers they
share (utils/notebook/) and the runner behind `make demo`. Running the notebooks
themselves is nbmake's job in `make test` (SMOKE=1)."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
import trimesh

from tsr.model import TSR
from utils.data.dataset import read_object
from utils.notebook import measuring, setup, tables
from utils.notebook import previews as nbh
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


def test_peak_memory_sees_a_temporary_allocation():
    with measuring.peak_memory("cpu") as memory:
        block = np.ones(100 * 2**20 // 8)  # 100 MB, touched
        del block
    assert 90 <= memory["peak_mb"] < 400, memory
    assert memory["how"]


def test_choose_threshold_keeps_the_models_level_when_the_field_crosses_it(tiny):
    code = torch.randn(1, 3, 8, 16, 16)
    quantile = nbh.choose_threshold(tiny, code, quantile=0.5)  # 25 is far above this field
    assert quantile < tiny.config.mc_threshold
    original = tiny.config.mc_threshold
    try:
        tiny.config.mc_threshold = quantile
        assert nbh.choose_threshold(tiny, code) == quantile
    finally:
        tiny.config.mc_threshold = original


def test_mesh_extraction_benchmark_records_each_case(tiny):
    code = torch.randn(3, 8, 16, 16)
    threshold = nbh.choose_threshold(tiny, code[None])
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
    points = nbh.depth_points(views, 1)
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
    rows = {row["parameters"]: row for row in nbh.gradient_norms(model)}
    assert rows["base weights"]["with a gradient"] == 0
    assert rows["lora_A"]["gradient norm"] == 0.0  # B = 0 at initialisation blocks A's gradient
    assert rows["lora_B"]["gradient norm"] > 0.0


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


def test_per_object_rows_and_the_most_changed_object_skip_nothing_but_empty_meshes():
    chamfer = {"base": [0.1, math.nan, 0.3], "LoRA": [0.12, 0.05, 0.2]}  # NaN: an empty mesh
    records = {
        model: [{"object_id": f"o{i}", "chamfer_l1": v} for i, v in enumerate(values)]
        for model, values in chamfer.items()
    }
    assert tables.most_changed(records, "chamfer_l1", "base", "LoRA") == 2
    rows = tables.per_object_table(records, ["chamfer_l1"])
    assert [row["object"] for row in rows] == ["o0", "o1", "o2"]
    assert rows[2] == {"object": "o2", "chamfer_l1 base": 0.3, "chamfer_l1 LoRA": 0.2}


def test_export_meshes_writes_every_format(tmp_path):
    rows = nbh.export_meshes({"box": trimesh.creation.box()}, tmp_path, ("obj", "glb"))
    assert [Path(row["path"]).name for row in rows] == ["box.obj", "box.glb"]
    assert len(trimesh.load(tmp_path / "box.glb", force="mesh").faces) == 12


# ---- scripts/run_notebooks.py -------------------------------------------------------------------
def test_runner_runs_in_order_keeps_copies_and_stops_at_the_first_failure(tmp_path):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    sources = {
        "02_c": "open('order.txt', 'a').write('c')",
        "00_a": "open('order.txt', 'a').write('a')",
        "01_b": "open('order.txt', 'a').write('b')\nraise ValueError('broken on purpose')",
    }
    for name, source in sources.items():
        notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
        nbformat.write(notebook, folder / f"{name}.ipynb")
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "scripts" / "run_notebooks.py"), "--notebooks",
               str(folder), "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1, done.stdout + done.stderr[-2000:]
    assert "00_a.ipynb: ok" in done.stdout and "01_b.ipynb: FAILED" in done.stdout
    assert "broken on purpose" in done.stderr
    assert (folder / "order.txt").read_text() == "ab"  # in order, in their folder, 02_c not run
    assert {p.name for p in out.iterdir()} == {
        "00_a.ipynb", "00_a.html", "01_b.ipynb", "01_b.html", "runtimes.json"
    }  # fmt: skip
    failed = nbformat.read(out / "01_b.ipynb", as_version=4)
    assert failed.cells[0].outputs[-1].output_type == "error"  # the copy shows what failed
