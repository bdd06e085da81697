"""Figures for the notebooks and CLIs: contact sheets, camera frustums, comparison grids,
benchmark lines, what a LoRA learned, and base-vs-LoRA scores per object.

Every function builds a `matplotlib.figure.Figure` directly (not through pyplot), so nothing
is shown twice by the inline backend and everything also works headless (Agg).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import trimesh
from matplotlib import colormaps
from matplotlib.figure import Figure

from utils.data.dataset import DEPTH_BACKGROUND
from utils.evaluation.report import METRICS
from utils.notebook.mesh_figures import face_colors

BACKGROUND_DEPTH_COLOR = "white"  # pixels whose depth is the dataset's DEPTH_BACKGROUND


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

    rgba (V, H, W, 4) uint8; depth (V, H, W) as the dataset stores it (DEPTH_BACKGROUND where
    a ray misses, drawn white); masks (V, H, W), by default the alpha channel. Depth shares one colour scale across views (near = dark).
    """
    rgba = np.asarray(rgba)
    n_views = rgba.shape[0]
    if masks is None:
        masks = rgba[..., 3] > 0
    rows = [("RGB", [_as_image(view) for view in rgba]), ("mask", list(np.asarray(masks)))]
    if depth is not None:
        depth = np.ma.masked_equal(np.asarray(depth, dtype=np.float32), DEPTH_BACKGROUND)
        hits = depth.compressed()
        near, far = (hits.min(), hits.max()) if hits.size else (0.0, 1.0)
        rows.append(("depth", list(depth)))
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
    (`max_points` samples of its surface in its colours: its vertices alone would be a few
    dots for a flat-sided part) or (N, 3) points drawn as a cloud. Returns the 3D axes."""
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
    if isinstance(points, trimesh.Trimesh):
        cloud, face = trimesh.sample.sample_surface(points, max_points, seed=0)
        ax.scatter(*np.asarray(cloud).T, s=3, c=face_colors(points)[face], depthshade=False)
    elif points is not None:
        cloud = np.asarray(points)
        if len(cloud) > max_points:
            cloud = cloud[np.random.default_rng(0).choice(len(cloud), max_points, replace=False)]
        ax.scatter(cloud[:, 0], cloud[:, 1], cloud[:, 2], s=1, color="0.4")
    # Each axis spans what is drawn (cameras and the object's cube) at one scale, so the flat
    # band of cameras does not leave the object small in a mostly empty cube.
    corners = np.einsum("kc,vrc->vkr", corners_cam, c2w[:, :3, :3]) + centres[:, None]  # (V, 4, 3)
    drawn = np.vstack([centres, corners.reshape(-1, 3), [[-0.87] * 3, [0.87] * 3]])
    low, high = drawn.min(axis=0) - 0.05, drawn.max(axis=0) + 0.05
    ax.set(xlim=(low[0], high[0]), ylim=(low[1], high[1]), zlim=(low[2], high[2]))
    ax.set_box_aspect(tuple(high - low), zoom=1.15)
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
            if image is not None and image.ndim == 2:  # grey levels in [0, 1], not stretched
                ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0)
            elif image is not None:
                ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0 and col_titles is not None:
                ax.set_title(col_titles[c], fontsize="small")
            if c == 0 and row_titles is not None:
                ax.set_ylabel(row_titles[r], fontsize="small")
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


def lora_update_plot(rows: Sequence[dict], top: int = 3) -> Figure:
    """What a LoRA learned, from `lora.update_norms` records. Left: ||(alpha/r) B A||_F of each
    wrapped layer as a heat map, kind of layer (rows) by backbone block (columns). Right: the
    singular values of the `top` layers that moved most (a fast drop: few directions used)."""
    kinds = list(dict.fromkeys(row["kind"] for row in rows))
    blocks = sorted(
        {row["block"] for row in rows}, key=lambda block: -1 if block is None else block
    )
    heat = np.full((len(kinds), len(blocks)), np.nan)  # (kinds, blocks)
    for row in rows:
        heat[kinds.index(row["kind"]), blocks.index(row["block"])] = row["update_norm"]
    fig = Figure(figsize=(5.0 + 0.5 * len(blocks), 1.0 + 0.4 * len(kinds)), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=(max(len(blocks), 3), 4))
    image = left.imshow(heat, cmap="viridis", aspect="auto")
    if heat.size <= 64:  # numbers fit in the cells
        for (k, b), value in np.ndenumerate(heat):
            left.text(b, k, f"{value:.2g}", ha="center", va="center", fontsize=7, color="w")
    left.set_xticks(range(len(blocks)), ["-" if block is None else str(block) for block in blocks])
    left.set_yticks(range(len(kinds)), kinds)
    left.set(xlabel="backbone block", title="update size ||(α/r) B A|| per layer")
    fig.colorbar(image, ax=left, shrink=0.8)
    largest = sorted(rows, key=lambda row: -row["update_norm"])[:top]
    for row in largest:
        values = row["singular_values"]
        label = f"block {row['block']} {row['kind']}"
        right.plot(range(1, len(values) + 1), values, "o-", ms=3, label=label)
    if largest and min(min(row["singular_values"]) for row in largest) > 0:
        right.set_yscale("log")
    right.set(xlabel="index (up to the rank r)", ylabel="singular value of (α/r) B A")
    right.set_title(f"the {len(largest)} layers that moved most", fontsize="medium")
    right.grid(alpha=0.3, which="both")
    right.legend(fontsize="small")
    return fig


def paired_scatter(
    records: dict[str, list[dict]],
    metrics: Sequence[str] = ("chamfer_l1", "f@0.05", "psnr", "mask_iou"),
    base: str = "base",
    other: str = "LoRA",
) -> Figure:
    """One point per object, `base`'s score across and `other`'s up, a panel per metric, the
    diagonal y = x drawn: points on the better side of it (below for lower-is-better metrics)
    in green, the others in red, with the counts in the title. Objects pair by position in
    `evaluate_model`'s records; an empty mesh's NaN is left out."""
    fig = Figure(figsize=(3.2 * len(metrics), 3.4), layout="constrained")
    for ax, metric in zip(fig.subplots(1, len(metrics), squeeze=False)[0], metrics, strict=True):
        label, better = METRICS[metric]
        pairs = np.array([(b[metric], o[metric]) for b, o in zip(records[base], records[other],
                                                                 strict=True)], dtype=float)  # fmt: skip
        pairs = pairs[np.isfinite(pairs).all(axis=1)]  # (N, 2)
        gain = pairs[:, 1] - pairs[:, 0] if better == "higher" else pairs[:, 0] - pairs[:, 1]
        colours = np.where(gain > 0, "tab:green", np.where(gain < 0, "tab:red", "0.5"))
        ax.scatter(pairs[:, 0], pairs[:, 1], s=14, c=colours, alpha=0.8)
        low, high = (pairs.min(), pairs.max()) if len(pairs) else (0.0, 1.0)
        pad = 0.05 * (high - low) or 0.05 * abs(high) or 0.05
        ax.plot([low - pad, high + pad], [low - pad, high + pad], color="0.4", lw=0.8, ls="--")
        ax.set(xlim=(low - pad, high + pad), ylim=(low - pad, high + pad), aspect="equal")
        ax.set(xlabel=f"{base}", ylabel=f"{other}")
        ax.locator_params(nbins=4)  # a narrow range's long tick labels would overlap
        side = "above" if better == "higher" else "below"
        ax.set_title(f"{label} ({better} is better: {side} the line)\n"
                     f"{other} better on {int((gain > 0).sum())}, worse on {int((gain < 0).sum())}"
                     f" of {len(pairs)}", fontsize="small")  # fmt: skip
        ax.grid(alpha=0.3)
    return fig
