"""Figures for the notebooks and CLIs: live loss curves, contact sheets, camera frustums,
comparison grids, metric bars and benchmark lines.

Every function builds a `matplotlib.figure.Figure` directly (not through pyplot), so nothing
is shown twice by the inline backend and everything also works headless (Agg).
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

BACKGROUND_DEPTH_COLOR = "white"  # depth maps store the background as +inf
# Logged validation metrics carry one of these prefixes; the curve is named without it.
VALIDATION_PREFIXES = ("val_", "val/", "validation_", "validation/")


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """PNG bytes of a figure; works with any backend, headless included."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def _in_notebook() -> bool:
    """True inside a Jupyter kernel, where a display handle can be updated in place."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def _as_number(value) -> float | None:
    """A float from a Python/NumPy number or a one-element tensor; None for anything else."""
    if isinstance(value, bool | str):
        return None
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):  # torch raises RuntimeError for many elements
        return None


def _loss_name(key: str) -> str:
    """'val_loss', 'val/loss' and 'loss' all name the same curve."""
    for prefix in VALIDATION_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


class LivePlot:
    """Training callback: train and validation loss curves, redrawn in place in a notebook.

    In a notebook the figure is one display output whose PNG is replaced at most every
    `min_interval_s` seconds (no flicker, no growing output). Elsewhere nothing is shown and
    `on_end` writes `out_png` if given. Plotted keys: `keys`, or every key ending in "loss".
    """

    def __init__(
        self,
        keys: Sequence[str] | None = None,
        out_png: str | Path | None = None,
        title: str = "training",
        log_y: bool = True,
        min_interval_s: float = 1.0,
    ):
        self.keys = list(keys) if keys is not None else None
        self.out_png = Path(out_png) if out_png is not None else None
        self.title = title
        self.log_y = log_y
        self.min_interval_s = min_interval_s
        self.train: dict[str, list[tuple[int, float]]] = {}  # key -> [(step, value)]
        self.validation: dict[str, list[tuple[int, float]]] = {}
        self._handle = None  # IPython display handle, created on the first draw
        self._last_draw = -math.inf  # the first step is always drawn

    def _record(self, history: dict, step: int, metrics: dict) -> None:
        for key, value in metrics.items():
            name = _loss_name(key)
            wanted = name in self.keys if self.keys is not None else name.endswith("loss")
            number = _as_number(value)
            if wanted and number is not None and math.isfinite(number):
                history.setdefault(name, []).append((int(step), number))

    def on_step(self, step: int, metrics: dict) -> None:
        self._record(self.train, step, metrics)
        self._maybe_draw()

    def on_validation(self, step: int, metrics: dict) -> None:
        self._record(self.validation, step, metrics)
        self._maybe_draw(force=True)

    def on_end(self) -> None:
        self._maybe_draw(force=True)
        if self.out_png is not None:
            self.savefig(self.out_png)

    def figure(self) -> Figure:
        """The current curves: solid = train, dots and dashes = validation, one colour per key."""
        fig = Figure(figsize=(6.4, 3.6))
        ax = fig.add_subplot()
        for index, name in enumerate(sorted(set(self.train) | set(self.validation))):
            color = f"C{index}"
            if name in self.train:
                steps, values = zip(*self.train[name], strict=True)
                ax.plot(steps, values, color=color, lw=1.2, label=f"train {name}")
            if name in self.validation:
                steps, values = zip(*self.validation[name], strict=True)
                ax.plot(steps, values, "o--", color=color, ms=4, label=f"val {name}")
        if ax.lines:
            ax.legend(loc="upper right", fontsize="small")
            all_values = [line.get_ydata() for line in ax.lines]
            if self.log_y and min(np.min(v) for v in all_values) > 0:
                ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(self.title)
        ax.grid(alpha=0.3)
        return fig

    def savefig(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(figure_png(self.figure()))
        return path

    def _maybe_draw(self, force: bool = False) -> None:
        if not _in_notebook():
            return
        now = time.monotonic()
        if not force and now - self._last_draw < self.min_interval_s:
            return
        self._last_draw = now
        from IPython.display import Image, display

        image = Image(data=figure_png(self.figure()))
        if self._handle is None:
            self._handle = display(image, display_id=True)
        else:
            self._handle.update(image)


def read_metrics(source: str | Path | Iterable[dict]) -> list[dict]:
    """Records from a metrics.jsonl file (one JSON object a line) or an iterable of dicts."""
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"metrics file not found: {path}; pass a metrics.jsonl path")
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return list(source)


def plot_loss_curves(source: str | Path | Iterable[dict], out_png: str | Path) -> Path:
    """Loss curves from logged records to a PNG. A record is validation when its `split` is
    'val'/'validation' or a key starts with 'val_'/'val/'; every record needs a `step`."""
    plot = LivePlot(out_png=out_png)
    for record in read_metrics(source):
        is_validation = record.get("split") in ("val", "validation") or any(
            key.startswith(VALIDATION_PREFIXES) for key in record
        )
        metrics = {k: v for k, v in record.items() if k not in ("step", "split")}
        (plot.on_validation if is_validation else plot.on_step)(record["step"], metrics)
    return plot.savefig(out_png)


def _as_image(image) -> np.ndarray | None:
    """uint8 or [0, 1] float arrays (H, W), (H, W, 3) or (H, W, 4), or torch tensors; RGBA is
    composited over white so the background reads as paper."""
    if image is None:
        return None
    array = np.asarray(image)
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    array = np.clip(array.astype(np.float32), 0.0, 1.0)
    if array.ndim == 3 and array.shape[-1] == 4:
        alpha = array[..., 3:]
        array = array[..., :3] * alpha + (1.0 - alpha)
    return array


def contact_sheet(
    rgba: np.ndarray,
    depth: np.ndarray | None = None,
    masks: np.ndarray | None = None,
    titles: Sequence[str] | None = None,
) -> Figure:
    """Views of one object in columns; rows RGB, mask, depth.

    rgba (V, H, W, 4) uint8; depth (V, H, W) with background = inf; masks (V, H, W), by
    default the alpha channel. Depth shares one colour scale across views (near = dark).
    """
    rgba = np.asarray(rgba)
    n_views = rgba.shape[0]
    if masks is None:
        masks = rgba[..., 3] > 0
    rows = [("RGB", [_as_image(view) for view in rgba]), ("mask", list(np.asarray(masks)))]
    if depth is not None:
        depth = np.asarray(depth, dtype=np.float32)
        finite = depth[np.isfinite(depth)]
        near, far = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
        rows.append(("depth", [np.ma.masked_invalid(view) for view in depth]))
    fig = Figure(figsize=(1.6 * n_views, 1.7 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), n_views, squeeze=False)
    for row, (name, images) in enumerate(rows):
        for col, image in enumerate(images):
            ax = axes[row, col]
            if name == "depth":
                cmap = colormaps["viridis"].with_extremes(bad=BACKGROUND_DEPTH_COLOR)
                ax.imshow(image, cmap=cmap, vmin=near, vmax=far)
            elif name == "mask":
                ax.imshow(image, cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(name)
            if row == 0:
                ax.set_title(titles[col] if titles is not None else f"view {col}", fontsize="small")
    return fig


def plot_camera_frustums(
    c2w: np.ndarray,
    fovy_deg: float,
    points=None,
    ax=None,
    aspect: float = 1.0,
    frustum_depth: float | None = None,
    max_points: int = 2000,
):
    """Cameras as pyramids around the object in TripoSR's world (z up); view 0, the
    conditioning view, in red. c2w (V, 4, 4) OpenGL camera-to-world; `points` is a trimesh
    or (N, 3) points drawn as a cloud. Returns the 3D axes."""
    c2w = np.asarray(c2w, dtype=np.float64)
    if ax is None:
        ax = Figure(figsize=(5, 5)).add_subplot(projection="3d")
    centres = c2w[:, :3, 3]  # (V, 3)
    if frustum_depth is None:
        frustum_depth = 0.25 * float(np.median(np.linalg.norm(centres, axis=-1)))
    half_h = frustum_depth * math.tan(math.radians(fovy_deg) / 2)
    half_w = half_h * aspect
    # Image corners in camera space (x right, y up, looking down -z): TL, TR, BR, BL.
    corners_cam = np.array(
        [[-half_w, half_h, -frustum_depth], [half_w, half_h, -frustum_depth],
         [half_w, -half_h, -frustum_depth], [-half_w, -half_h, -frustum_depth]]
    )  # fmt: skip
    for index, pose in enumerate(c2w):
        corners = corners_cam @ pose[:3, :3].T + pose[:3, 3]  # (4, 3)
        color, width = ("red", 2.0) if index == 0 else ("C0", 0.8)
        for corner in corners:
            ax.plot(*zip(pose[:3, 3], corner, strict=True), color=color, lw=width)
        ring = np.vstack([corners, corners[:1]])
        ax.plot(ring[:, 0], ring[:, 1], ring[:, 2], color=color, lw=width)
        # A tick on the top edge shows which way is up in the image.
        top = corners[:2].mean(0) + pose[:3, 1] * 0.3 * half_h
        ax.plot(*zip(corners[0], top, corners[1], strict=True), color=color, lw=width)
    ax.plot([], [], color="red", lw=2, label="view 0 (conditioning)")
    if points is not None:
        cloud = np.asarray(points.vertices if hasattr(points, "vertices") else points)
        if len(cloud) > max_points:
            cloud = cloud[np.random.default_rng(0).choice(len(cloud), max_points, replace=False)]
        ax.scatter(cloud[:, 0], cloud[:, 1], cloud[:, 2], s=1, color="0.4")
    extent = float(np.abs(centres).max()) + frustum_depth
    ax.set(xlim=(-extent, extent), ylim=(-extent, extent), zlim=(-extent, extent))
    ax.set_box_aspect((1, 1, 1))
    ax.set(xlabel="x", ylabel="y", zlabel="z (up)")
    ax.legend(loc="upper left", fontsize="small")
    return ax


def comparison_grid(
    rows: Sequence[Sequence],
    row_titles: Sequence[str] | None = None,
    col_titles: Sequence[str] | None = None,
    panel_inches: float = 1.8,
) -> Figure:
    """Images in a grid, e.g. input | target | prediction per object, or base | LoRA.
    An image may be None (an empty panel)."""
    n_rows, n_cols = len(rows), max(len(row) for row in rows)
    fig = Figure(figsize=(panel_inches * n_cols, panel_inches * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r in range(n_rows):
        for c in range(n_cols):
            ax = axes[r, c]
            image = _as_image(rows[r][c]) if c < len(rows[r]) else None
            if image is not None:
                ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0 and col_titles is not None:
                ax.set_title(col_titles[c], fontsize="small")
            if c == 0 and row_titles is not None:
                ax.set_ylabel(row_titles[r], fontsize="small")
    return fig


def _value_and_stderr(metrics: dict, metric: str) -> tuple[float, float]:
    """A metric given as a number, (value, stderr), or a number plus a sibling '<metric>_stderr'."""
    value = metrics.get(metric, np.nan)
    if isinstance(value, tuple | list):
        return float(value[0]), float(value[1])
    return float(value), float(metrics.get(f"{metric}_stderr", 0.0))


def metrics_bar_plot(table: dict[str, dict], metrics: Sequence[str] | None = None) -> Figure:
    """One panel per metric (own scale), one bar per model, stderr as error bars.
    table: model -> metric -> value | (value, stderr); '<metric>_stderr' keys also work."""
    models = list(table)
    if metrics is None:
        names = [k for row in table.values() for k in row if not k.endswith("_stderr")]
        metrics = list(dict.fromkeys(names))
    fig = Figure(figsize=(2.6 * len(metrics), 3.0), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        values, errors = zip(*(_value_and_stderr(table[m], metric) for m in models), strict=True)
        positions = np.arange(len(models))
        ax.bar(positions, values, yerr=errors, capsize=4, color=[f"C{i}" for i in positions])
        ax.set_xticks(positions, models, rotation=20)
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
    return fig


def benchmark_plot(
    records: Sequence[dict],
    x: str,
    ys: Sequence[str] = ("seconds", "peak_memory_mb"),
    group_by: str | None = None,
    log_x: bool = True,
    log_y: bool = True,
) -> Figure:
    """Measurements as lines: one panel per quantity in `ys` against `x` (e.g. chunk size),
    one line per value of `group_by` (e.g. resolution); log axes by default."""
    groups: dict = {}
    for record in records:
        groups.setdefault(record.get(group_by) if group_by else None, []).append(record)
    fig = Figure(figsize=(4.0 * len(ys), 3.2), layout="constrained")
    axes = fig.subplots(1, len(ys), squeeze=False)[0]
    for ax, y in zip(axes, ys, strict=True):
        for group, rows in groups.items():
            rows = sorted(rows, key=lambda r: r[x])
            label = f"{group_by}={group}" if group_by else None
            ax.plot([r[x] for r in rows], [r[y] for r in rows], "o-", label=label)
        ax.set(xlabel=x, ylabel=y)
        if log_x:
            ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        if group_by:
            ax.legend(fontsize="small")
    return fig
