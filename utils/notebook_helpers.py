"""What the notebooks share that is no pipeline stage of its own.

- Set-up: `repo_root`, `seed_everything`, and `ensure_dataset` / `ensure_adapter`, which make
  the dataset and the adapter a notebook needs when an earlier notebook has not, so every
  notebook also runs alone (and under nbmake, in any order).
- Measuring mesh extraction (notebook 04): `peak_memory` and `mesh_extraction_benchmark`,
  records for `utils.plots.benchmark_plot`.
- Pictures and controls: `markdown_table`, `render_camera`, `PreviewCallback` (fit()'s
  input | target | prediction previews), `object_gallery`, `mesh_explorer`, `export_meshes`.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import math
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import psutil
import torch
import trimesh

from tsr import mesh as mesh_extraction
from tsr.cameras import rays_from_c2w
from tsr.model import TSR

from . import lora
from .data import MultiViewDataset, prepare_dataset
from .plots import comparison_grid, figure_png

# Notebook 01's dataset: the family the LoRA story adapts the classroom model to (it was
# pretrained on primitives only), with occupancy points for the 3D losses; ~1 min.
WORKBOOK_DATASET = {"families": ("parts",), "n_objects": 600, "n_views": 5, "size": 128,
                    "seed": 1, "occupancy_points": 2048}  # fmt: skip
# Notebook 03's LoRA recipe for parts on the classroom model (measured: README, "The
# classroom model"): rays plus the occupancy loss the model was pretrained with, no LPIPS
# (its VGG weights are a download), early stopping on the validation loss.
LORA_RECIPE = {"batch_size": 4, "rays_per_object": 1024, "lr": 1e-3, "lambda_mask": 0.1,
               "lambda_lpips": 0.0, "lambda_occupancy": 1.0, "occupancy_sdf_scale": 100.0,
               "early_stopping_patience": 4}  # fmt: skip
LORA_STEPS = 800  # at most; ~10 min on 2 CPU cores
# CI sizes for SMOKE=1: built in about a second on 2 cores.
SMOKE_DATASET = {"families": ("parts",), "n_objects": 6, "n_views": 4, "size": 64, "seed": 1,
                 "occupancy_points": 256}  # fmt: skip
RAY_CHUNK = 16384  # rays per render_rays call: bounds memory at any picture size
SAMPLE_EVERY_S = 0.002  # RSS sampling period where the kernel's peak counter cannot be reset
# The columns of mesh_extraction_benchmark's records worth a table.
BENCHMARK_COLUMNS = ("method", "resolution", "chunk_size", "seconds", "peak_memory_mb", "volume_mb",
                     "n_queries", "n_faces", "memory_measure")  # fmt: skip


def repo_root() -> Path:
    """The repository folder (pyproject.toml + tsr/): from the working folder upwards, else
    where this package lives. Notebooks chdir there, so their paths are repository paths."""
    here = Path.cwd().resolve()
    for folder in (here, *here.parents, Path(__file__).resolve().parents[1]):
        if (folder / "pyproject.toml").is_file() and (folder / "tsr").is_dir():
            return folder
    raise FileNotFoundError(f"no repository (pyproject.toml and tsr/) above {here}")


def seed_everything(seed: int = 0) -> None:
    """Python's, NumPy's legacy and torch's global generators (fit() seeds its own too)."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - the global generator third-party code draws from
    torch.manual_seed(seed)


def ensure_dataset(root: str | Path, smoke: bool = False) -> Path:
    """`root` as it is when it holds a dataset (split.json); otherwise build one there first:
    notebook 01's (WORKBOOK_DATASET, ~1 min on 2 cores) or the SMOKE set."""
    root = Path(root)
    if not (root / "split.json").is_file():
        print(f"no dataset in {root} yet (notebook 01 builds it): building it now")
        prepare_dataset(root, **(SMOKE_DATASET if smoke else WORKBOOK_DATASET))
    return root


def ensure_adapter(
    model_name: str, data: str | Path, run_dir: str | Path, device: str = "cpu", steps: int = 60
) -> Path:
    """`run_dir/adapter` when notebook 03 made it for these base weights; otherwise a short
    LoRA run of `steps` steps makes it (the fingerprint in tsr_adapter.json tells)."""
    from .train import TrainConfig, fit  # the training loop only when it is needed

    adapter = Path(run_dir) / "adapter"
    model = TSR.from_pretrained(model_name)
    metadata = adapter / lora.TSR_METADATA
    if metadata.is_file():
        if json.loads(metadata.read_text()).get("base_fingerprint") == model.weights_fingerprint():
            return adapter
        print(f"{adapter} was trained on other base weights than {model_name!r}")
    print(f"no adapter for {model_name!r} in {adapter}: a short run of {steps} steps makes one")
    lora.add_lora(model, r=16, alpha=16, dropout=0.05)  # notebook 03's adapter
    train = MultiViewDataset(data, "train", 4, cond_size=model.config.cond_image_size)
    config = TrainConfig(**LORA_RECIPE, max_steps=steps, val_every=0, checkpoint_every=steps)
    return fit(model.to(device), train, config, output_dir=run_dir).artefact


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None, digits: int = 3):
    """Records as a Markdown table for display (floats rounded to `digits` significant)."""
    from IPython.display import Markdown

    columns = list(columns or dict.fromkeys(key for row in rows for key in row))

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.{digits}g}"
        return (
            f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
        )

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return Markdown("\n".join(lines))


def files_table(folder: str | Path):
    """Every file under `folder` with its size, as a Markdown table."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return markdown_table(
        [{"file": str(p.relative_to(folder)), "kB": p.stat().st_size // 1024} for p in files]
    )


def parameter_table(models: dict[str, torch.nn.Module]):
    """Parameters per top-level component (image_tokenizer, backbone, ...), a column per model."""

    def count(module: torch.nn.Module | None) -> int:
        return 0 if module is None else sum(p.numel() for p in module.parameters())

    parts = dict.fromkeys(name for m in models.values() for name, _ in m.named_children())
    rows = [
        {"component": part, **{label: count(getattr(m, part, None)) for label, m in models.items()}}
        for part in parts
    ]
    rows.append({"component": "total", **{label: count(m) for label, m in models.items()}})
    return markdown_table(rows)


def split_counts(statistics: dict) -> list[dict]:
    """Objects per split and family from `utils.data.dataset_statistics`. -> table rows"""
    objects = statistics["objects"]
    rows = []
    for split in ("train", "val", "test"):
        families = [o["family"] for o in objects if o["split"] == split]
        counts = {f: families.count(f) for f in sorted({o["family"] for o in objects})}
        rows.append({"split": split, **counts, "total": len(families)})
    return rows


def depth_points(views: dict, view: int) -> np.ndarray:
    """Back-project one view's depth map (from `read_object`) through tsr's cameras: the
    world point seen at every foreground pixel. -> (N, 3)"""
    depth = torch.from_numpy(views["depth"][view])  # (H, W) ray distance, 0 = background
    c2w = torch.from_numpy(views["c2w"][view : view + 1])
    rays_o, rays_d = rays_from_c2w(c2w, *depth.shape, views["fovy_deg"])  # (1, H, W, 3)
    points = rays_o[0] + rays_d[0] * depth[..., None]
    return points[depth > 0].numpy()


def gradient_norms(model: torch.nn.Module) -> list[dict]:
    """Gradient norm and count of the parameters that have a gradient, by kind: LoRA's A, its
    B, and everything else (which must be absent when only the adapter trains)."""
    kinds: dict[str, list[torch.Tensor]] = {"lora_A": [], "lora_B": [], "base weights": []}
    for name, parameter in model.named_parameters():
        kind = next((k for k in ("lora_A", "lora_B") if k in name), "base weights")
        if parameter.grad is not None:
            kinds[kind].append(parameter.grad.detach().flatten())
    return [
        {"parameters": kind, "with a gradient": len(grads),
         "gradient norm": float(torch.cat(grads).norm()) if grads else 0.0}
        for kind, grads in kinds.items()
    ]  # fmt: skip


# ---- measuring mesh extraction ---------------------------------------------------------------
def _status_mb(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in MB."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1)) / 1024


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False where that is impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_mb("VmHWM") >= 0
    except (OSError, AttributeError):  # no /proc, or no VmHWM line
        return False


def _return_freed_memory() -> None:
    """Hand memory freed by earlier work back to the OS, so the next baseline is honest."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def peak_memory(device: str | torch.device = "cpu") -> Iterator[dict]:
    """Peak memory of the block in MB above its start, put in the yielded dict as `peak_mb`,
    with `how` it was measured: CUDA: max_memory_allocated (tensors only, exact). CPU on
    Linux: the kernel's peak-RSS counter, reset at the start (whole process, exact).
    Elsewhere: RSS sampled every 2 ms by a thread (can miss peaks shorter than that)."""
    device = torch.device(device)
    result: dict = {}
    _return_freed_memory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        result.update(peak_mb=(peak - start) / 2**20, how="CUDA max_memory_allocated")
        return
    process = psutil.Process()
    start = process.memory_info().rss / 2**20
    if _reset_peak_rss():
        yield result
        result.update(peak_mb=_status_mb("VmHWM") - start, how="peak RSS (Linux VmHWM)")
        return
    samples, done = [start], threading.Event()

    def sample() -> None:
        while not done.wait(SAMPLE_EVERY_S):
            samples.append(process.memory_info().rss / 2**20)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        done.set()
        sampler.join()
    samples.append(process.memory_info().rss / 2**20)
    result.update(peak_mb=max(samples) - start, how="RSS sampled every 2 ms")


def mesh_extraction_benchmark(
    model: TSR,
    scene_code: torch.Tensor,
    threshold: float,
    resolutions: Sequence[int] = (64, 128),
    chunk_sizes: Sequence[int] | None = None,
    methods: Sequence[str] = ("dense",),
    repeats: int = 1,
) -> list[dict]:
    """Time and peak memory of one extraction (grid queries + marching cubes) for every
    (method, resolution, chunk size); chunk_sizes None: the device's default. The grid's
    chunk is what the decoder sees (the renderer's own chunking is off meanwhile). `seconds`
    is the best of `repeats` runs (others' work on a shared CPU only ever adds time), its split
    into queries and marching cubes the last run's. scene_code (3, C, H, W). -> a record each"""
    device = scene_code.device
    chunk_sizes = chunk_sizes or [mesh_extraction.default_chunk_size(device)]
    previous_chunk = model.renderer.chunk_size
    model.renderer.set_chunk_size(0)

    def density(points: torch.Tensor) -> torch.Tensor:  # (N, 3) -> (N,)
        return model.renderer.query_triplane(model.decoder, points, scene_code)["density_act"][:, 0]

    records = []
    try:
        for method in methods:
            for resolution in resolutions:
                for chunk_size in chunk_sizes:
                    seconds, extraction = math.inf, None
                    with peak_memory(device) as memory:
                        for _ in range(repeats):
                            extraction = None  # the last run's mesh must not count in this one
                            start = time.perf_counter()
                            extraction = mesh_extraction.extract_isosurface(
                                density, resolution, threshold, model.config.renderer.radius,
                                chunk_size, method=method, device=device,
                            )  # fmt: skip
                            seconds = min(seconds, time.perf_counter() - start)
                    records.append({
                        "method": extraction.method, "resolution": resolution,
                        "chunk_size": chunk_size, "seconds": seconds,
                        "query_seconds": extraction.query_seconds,
                        "marching_seconds": extraction.marching_seconds,
                        "peak_memory_mb": memory["peak_mb"],
                        "volume_mb": 4 * resolution**3 / 2**20,  # one float32 level volume
                        "n_queries": extraction.n_queries, "n_faces": len(extraction.faces),
                        "memory_measure": memory["how"],
                    })  # fmt: skip
    finally:
        model.renderer.set_chunk_size(previous_chunk)
    return records


@torch.no_grad()
def choose_threshold(model: TSR, scene_codes: torch.Tensor, quantile: float = 0.9) -> float:
    """The model's own marching-cubes level when every scene's density crosses it, else the
    `quantile` of the first scene's density on a 32^3 grid (an untrained model's density never
    reaches a trained one's level, and its mesh would be empty)."""
    axis = mesh_extraction.grid_axis(32, model.config.renderer.radius, scene_codes.device)
    grid = torch.cartesian_prod(axis, axis, axis)  # (32^3, 3)
    fields = [
        model.renderer.query_triplane(model.decoder, grid, code)["density_act"][:, 0].float()
        for code in scene_codes
    ]
    level = model.config.mc_threshold
    if all(field.min() < level < field.max() for field in fields):
        return level
    chosen = float(fields[0].quantile(quantile))
    low, high = float(fields[0].min()), float(fields[0].max())
    print(
        f"the model's threshold {level:g} is outside its density range [{low:.3g}, {high:.3g}] "
        f"here (an untrained model?): using the {quantile:.0%} quantile, {chosen:.3g}"
    )
    return chosen


# ---- pictures ---------------------------------------------------------------------------------
@torch.no_grad()
def render_camera(
    model: TSR, scene_code: torch.Tensor, c2w: torch.Tensor, fovy_deg: float, size: int = 128
) -> np.ndarray:
    """One camera (4, 4) of a scene (3, C, H, W), size x size pixels -> (S, S, 3) in [0, 1]."""
    device = scene_code.device
    rays_o, rays_d = rays_from_c2w(c2w[None].float(), size, size, fovy_deg)  # (1, S, S, 3)
    rays_o, rays_d = rays_o.reshape(-1, 3).to(device), rays_d.reshape(-1, 3).to(device)
    rgb = torch.cat([
        model.render_rays(scene_code, rays_o[i : i + RAY_CHUNK], rays_d[i : i + RAY_CHUNK])["rgb"]
        for i in range(0, len(rays_o), RAY_CHUNK)
    ])  # fmt: skip
    return rgb.float().clamp(0, 1).reshape(size, size, 3).cpu().numpy()


def _encode(model: TSR, cond_image: torch.Tensor) -> torch.Tensor:
    """(S, S, 3) conditioning image -> (3, C, H, W) scene code, in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        code = model.encode(cond_image[None].to(next(model.parameters()).device))[0]
    model.train(was_training)
    return code


def _show_in_place(handle, png: bytes):
    """Display a PNG, or replace what `handle` showed; -> the handle (None outside Jupyter)."""
    from IPython import get_ipython
    from IPython.display import Image, display

    if get_ipython() is None:
        return None
    if handle is None:
        return display(Image(data=png), display_id=True)
    handle.update(Image(data=png))
    return handle


class PreviewCallback:
    """fit() callback: at each validation, one validation object rendered from a novel view:
    input (view 0) | target | prediction, a row per validation (the last `max_rows`),
    redrawn in place in a notebook."""

    def __init__(self, model: TSR, dataset, index: int = 0, view: int = 1, size: int = 96,
                 max_rows: int = 4):  # fmt: skip
        item = dataset[index]
        self.model, self.size, self.max_rows = model, size, max_rows
        self.cond, self.target = item["cond_image"], item["rgb"][view]
        self.c2w, self.fovy_deg = item["c2w"][view], item["fovy_deg"]
        self.rows: list[tuple[str, list]] = []
        self._handle = None

    def on_validation(self, step: int, metrics: dict) -> None:
        if "val_loss" not in metrics:  # mesh-metric records come through here too
            return
        code = _encode(self.model, self.cond)
        prediction = render_camera(self.model, code, self.c2w, self.fovy_deg, self.size)
        self.rows = [*self.rows, (f"step {step}", [self.cond, self.target, prediction])]
        self.rows = self.rows[-self.max_rows :]
        self._handle = _show_in_place(self._handle, figure_png(self.figure()))

    def figure(self):
        titles = ["input (view 0)", "target (novel view)", "prediction"]
        return comparison_grid([r for _, r in self.rows], [t for t, _ in self.rows], titles)


def object_gallery(
    models: dict[str, TSR], dataset, view: int = 1, size: int = 128, max_objects: int = 6
):
    """Per object a row: input (view 0) | target (a novel view) | each model's render of it."""
    rows, names = [], []
    for index in range(min(len(dataset), max_objects)):
        item = dataset[index]
        renders = [
            render_camera(m, _encode(m, item["cond_image"]), item["c2w"][view], item["fovy_deg"], size)
            for m in models.values()
        ]  # fmt: skip
        rows.append([item["cond_image"], item["rgb"][view], *renders])
        names.append(item["object_id"])
    return comparison_grid(rows, names, ["input (view 0)", f"target (view {view})", *models])


def per_object_table(
    records: dict[str, list[dict]], metrics: Sequence[str], models: Sequence[str] | None = None
) -> list[dict]:
    """One row per object, a column per (metric, model) of `models` (default: all), from
    evaluate_model's records."""
    rows = {}
    for model in models or records:
        for record in records[model]:
            row = rows.setdefault(record["object_id"], {"object": record["object_id"]})
            row.update(
                {f"{metric} {model}": record.get(metric, float("nan")) for metric in metrics}
            )
    return list(rows.values())


def most_changed(records: dict[str, list[dict]], metric: str, base: str, other: str) -> int:
    """Index of the object whose `metric` differs most between two models (finite values)."""
    changes = [
        abs(b[metric] - o[metric]) if math.isfinite(b[metric] - o[metric]) else -1.0
        for b, o in zip(records[base], records[other], strict=True)
    ]
    return int(np.argmax(changes))


# ---- meshes -------------------------------------------------------------------------------------
def mesh_explorer(
    extract: Callable[[int, float], dict[str, trimesh.Trimesh]],
    resolution: int,
    threshold: float,
    threshold_range: tuple[float, float],
    resolutions: Sequence[int] = (32, 64, 96, 128, 192, 256),
):
    """Resolution and threshold controls and an "extract" button above the meshes that
    `extract(resolution, threshold)` returns, side by side. The meshes for the starting values
    are drawn at once (plain outputs: a headless run keeps them); a click re-extracts and
    replaces them in place. -> the controls (an HBox)"""
    import ipywidgets as widgets
    from IPython.display import Image, display

    from .viewer import meshes_side_by_side_widget, resolve_display_mode, static_mesh_figure

    resolution_slider = widgets.SelectionSlider(
        options=sorted({*resolutions, resolution}), value=resolution, description="resolution"
    )
    threshold_slider = widgets.FloatSlider(
        value=threshold, min=threshold_range[0], max=threshold_range[1],
        step=(threshold_range[1] - threshold_range[0]) / 200, description="threshold",
        readout_format=".3g",
    )  # fmt: skip
    button = widgets.Button(description="extract mesh", icon="cube")
    status = widgets.HTML()
    controls = widgets.HBox([resolution_slider, threshold_slider, button, status])
    display(controls)
    mode, handles = resolve_display_mode(), {}

    def draw(meshes: dict[str, trimesh.Trimesh]) -> None:
        parts = {}
        if mode in ("both", "widget"):
            parts["widget"] = meshes_side_by_side_widget(meshes)[0]
        if mode in ("both", "static"):
            parts["static"] = Image(data=figure_png(static_mesh_figure(meshes)))
        for key, part in parts.items():
            if key in handles:
                handles[key].update(part)
            else:
                handles[key] = display(part, display_id=True)

    def on_click(_button) -> None:
        status.value = "extracting…"
        start = time.perf_counter()
        meshes = extract(resolution_slider.value, threshold_slider.value)
        draw(meshes)
        faces = ", ".join(f"{name} {len(m.faces):,}" for name, m in meshes.items())
        status.value = f"{time.perf_counter() - start:.1f} s · faces: {faces}"

    button.on_click(on_click)
    on_click(button)
    return controls


def export_meshes(
    meshes: dict[str, trimesh.Trimesh], folder: str | Path, formats: Sequence[str] = ("obj", "glb")
) -> list[dict]:
    """Write every mesh in every format as folder/<name>.<format>, in TripoSR's world (z up,
    as `python -m tsr` writes them). -> one record per file: name, format, path, size."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, mesh in meshes.items():
        for fmt in formats:
            path = folder / f"{name}.{fmt}"
            mesh.export(path)
            rows.append(
                {"name": name, "format": fmt, "path": str(path), "kB": path.stat().st_size // 1024}
            )
    return rows
