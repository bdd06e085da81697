"""Pictures and controls the notebooks show: `render_camera`, `PreviewCallback` (fit()'s
input | target | prediction previews during training), `object_gallery`, `mesh_explorer`,
`export_meshes`, and the small views into a model a notebook prints (`depth_points`,
`gradient_norms`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import trimesh

from tsr.cameras import rays_from_c2w
from tsr.files import atomic_path
from tsr.model import TSR
from utils.figures import figure_png
from utils.notebook.plots import comparison_grid


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


# ---- pictures ---------------------------------------------------------------------------------
@torch.no_grad()
def render_camera(
    model: TSR, scene_code: torch.Tensor, c2w: torch.Tensor, fovy_deg: float, size: int = 128
) -> np.ndarray:
    """One camera (4, 4) of a scene (3, C, H, W), size x size pixels -> (S, S, 3) in [0, 1]."""
    rgb = model.render_cameras(scene_code, c2w[None], fovy_deg, size, size)["rgb"][0]
    return rgb.float().clamp(0, 1).cpu().numpy()


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
    input (view 0) | target | prediction | its change since the first validation, redrawn in
    place in a notebook. Rows: the first validation (the model before training) and the last
    `max_rows - 1`. A LoRA moves a render by a few percent, invisible side by side, so the
    change is amplified by one gain for all rows (in the column title): dark = changed."""

    def __init__(self, model: TSR, dataset, index: int = 0, view: int = 1, size: int = 96,
                 max_rows: int = 4):  # fmt: skip
        item = dataset[index]
        self.model, self.size, self.max_rows = model, size, max_rows
        self.cond, self.target = item["cond_image"], item["rgb"][view]
        self.c2w, self.fovy_deg = item["c2w"][view], item["fovy_deg"]
        self.predictions: list[tuple[int, np.ndarray]] = []  # (step, (S, S, 3)) per validation
        self._handle = None

    def on_validation(self, step: int, metrics: dict) -> None:
        if "val_loss" not in metrics:  # mesh-metric records come through here too
            return
        code = _encode(self.model, self.cond)
        prediction = render_camera(self.model, code, self.c2w, self.fovy_deg, self.size)
        self.predictions.append((step, prediction))
        self._handle = _show_in_place(self._handle, figure_png(self.figure()))

    def shown(self) -> list[tuple[int, np.ndarray]]:
        """The rows drawn: the first validation and the last `max_rows - 1`."""
        first, later = self.predictions[:1], self.predictions[1:]
        return (
            first + later[max(len(later) - (self.max_rows - 1), 0) :]
            if self.max_rows > 1
            else first
        )

    def figure(self):
        shown = self.shown()
        start = shown[0][1]
        changes = [np.abs(prediction - start).mean(axis=-1) for _, prediction in shown]  # (S, S)
        gain = 1.0 / max(max(float(c.max()) for c in changes), 1e-3)  # the largest change: black
        rows = [
            [self.cond, self.target, prediction, 1.0 - np.clip(change * gain, 0, 1) if i else None]
            for i, ((_, prediction), change) in enumerate(zip(shown, changes, strict=True))
        ]
        first_step = shown[0][0]
        titles = ["input (view 0)", "target (novel view)", "prediction",
                  f"change since step {first_step} (x{gain:.0f})"]  # fmt: skip
        return comparison_grid(rows, [f"step {step}" for step, _ in shown], titles)


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
    from IPython.display import display

    from utils.notebook.viewer import (
        meshes_side_by_side_widget,
        resolve_display_mode,
        static_picture,
    )

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
            parts["static"] = static_picture(meshes, mode)
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
            with atomic_path(path) as temporary:
                mesh.export(temporary)
            rows.append(
                {"name": name, "format": fmt, "path": str(path), "kB": path.stat().st_size // 1024}
            )
    return rows
