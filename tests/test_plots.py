"""Figures: live loss curves, contact sheets, camera frustums, grids, bars, benchmarks."""

import io
import json
import math

import matplotlib
import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

matplotlib.use("Agg")

from tsr.cameras import orbit_cameras
from utils import figures
from utils.data.dataset import DEPTH_BACKGROUND
from utils.evaluation import report
from utils.notebook import plots
from utils.training import curves


def decoded(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_live_plot_outside_a_notebook_writes_train_and_validation_curves(tmp_path):
    out = tmp_path / "curves" / "loss.png"
    live = curves.LivePlot(out_png=out)
    for step in range(1, 6):
        record = {"loss": 3.0 / step, "loss_render": 1.0 / step, "loss_occupancy": 2.0 / step}
        live.on_step(step, {**record, "lr": 1e-3, "note": "text"})
    live.on_validation(3, {"val_loss": 0.4, "val_psnr": 20.0})
    live.on_validation(5, {"val/loss": 0.3})
    live.on_end()
    assert out.is_file() and decoded(out).std() > 10
    compared, terms = live.figure().axes
    # validation's loss is the render loss: it is drawn beside training's render loss only
    lines = compared.lines
    assert [line.get_label() for line in lines] == ["train loss_render", "val loss"]
    np.testing.assert_allclose(lines[0].get_ydata(), [1, 1 / 2, 1 / 3, 1 / 4, 1 / 5])
    np.testing.assert_array_equal(lines[1].get_xdata(), [3, 5])
    np.testing.assert_allclose(lines[1].get_ydata(), [0.4, 0.3])
    assert [line.get_label() for line in terms.lines] == ["loss", "loss_occupancy"]
    np.testing.assert_allclose(terms.lines[0].get_ydata(), [3, 3 / 2, 1, 3 / 4, 3 / 5])


def test_live_plot_never_pairs_training_total_with_validation_render_loss():
    live = curves.LivePlot()
    live.on_step(1, {"loss": 1.3})  # the total: render + 3D terms, no render term logged
    live.on_validation(1, {"val_loss": 0.1})
    compared, terms = live.figure().axes
    assert [line.get_label() for line in compared.lines] == ["val loss"]
    assert [line.get_label() for line in terms.lines] == ["loss"]


def test_live_plot_reads_tensors_and_skips_non_finite_values():
    live = curves.LivePlot(keys=["rgb_loss"])
    live.on_step(1, {"rgb_loss": torch.tensor(0.5), "mask_loss": 0.1})
    live.on_step(2, {"rgb_loss": float("nan")})
    assert live.train == {"rgb_loss": [(1, 0.5)]}


def test_live_plot_in_a_notebook_updates_one_output_in_place(monkeypatch):
    class Handle:
        updates = 0

        def update(self, obj):
            Handle.updates += 1

    displayed = []

    def fake_display(obj, display_id=False):
        displayed.append(obj)
        return Handle()

    monkeypatch.setattr(curves, "_in_notebook", lambda: True)
    monkeypatch.setattr("IPython.display.display", fake_display)
    live = curves.LivePlot(min_interval_s=3600)  # only forced redraws after the first
    for step in range(10):
        live.on_step(step, {"loss": 1.0})
    live.on_validation(10, {"loss": 0.5})
    live.on_end()
    assert len(displayed) == 1  # one output, never a new one per step
    assert Handle.updates == 2  # validation and end redraw it in place
    assert displayed[0].data.startswith(b"\x89PNG")


def test_plot_loss_curves_writes_a_file_and_displays_nothing(tmp_path, monkeypatch):
    """fit() calls it at the end of every run: in a notebook, a displayed copy repeated the
    live plot (notebook 03 showed its final loss curve four times)."""
    displayed = []
    monkeypatch.setattr(curves, "_in_notebook", lambda: True)
    monkeypatch.setattr("IPython.display.display", lambda obj, **kw: displayed.append(obj))
    records = [{"step": s, "split": "train", "loss": 1 / s} for s in range(1, 4)]
    assert curves.plot_loss_curves(records, tmp_path / "loss.png").is_file()
    assert displayed == []
    curves.LivePlot().on_step(1, {"loss": 1.0})  # the live plot itself still shows
    assert len(displayed) == 1


def test_plot_loss_curves_from_jsonl(tmp_path):
    records = [{"step": s, "split": "train", "loss": 1 / s} for s in range(1, 4)]
    records.append({"step": 3, "split": "val", "loss": 0.5})
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = curves.plot_loss_curves(path, tmp_path / "loss.png")
    assert decoded(out).std() > 10
    assert curves.plot_loss_curves(records, tmp_path / "again.png").is_file()
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        curves.plot_loss_curves(tmp_path / "nope.jsonl", tmp_path / "x.png")


def synthetic_views(n_views=3, size=16):
    rgba = np.zeros((n_views, size, size, 4), dtype=np.uint8)
    rgba[:, 4:12, 4:12] = [200, 50, 50, 255]
    depth = np.full((n_views, size, size), DEPTH_BACKGROUND, dtype=np.float32)  # as stored
    depth[:, 4:12, 4:12] = np.linspace(1.0, 2.0, n_views)[:, None, None]
    return rgba, depth


def test_contact_sheet_has_a_row_per_kind_and_a_column_per_view():
    rgba, depth = synthetic_views()
    fig = plots.contact_sheet(rgba, depth, titles=["a", "b", "c"])
    axes = np.array(fig.axes).reshape(3, 3)
    assert [ax.get_ylabel() for ax in axes[:, 0]] == ["RGB", "mask", "depth"]
    assert [ax.get_title() for ax in axes[0]] == ["a", "b", "c"]
    mask = axes[1, 0].images[0].get_array()
    np.testing.assert_array_equal(np.asarray(mask), rgba[0, ..., 3] > 0)  # alpha by default
    assert axes[0, 0].images[0].get_array()[0, 0].tolist() == [1.0, 1.0, 1.0]  # over white
    shown_depth = axes[2, 0].images[0].get_array()  # the stored background is drawn as "bad"
    np.testing.assert_array_equal(np.ma.getmaskarray(shown_depth), depth[0] == DEPTH_BACKGROUND)
    assert len(plots.contact_sheet(rgba).axes) == 2 * 3
    wide = Image.open(io.BytesIO(figures.figure_png(plots.contact_sheet(*synthetic_views(6)))))
    assert wide.size[0] > 1.5 * wide.size[1]  # views side by side, kinds stacked


def test_camera_frustums_put_apexes_at_camera_centres_and_mark_view_zero():
    c2w = orbit_cameras(4, elevation_deg=20.0, camera_distance=1.9).numpy()
    ax = plots.plot_camera_frustums(
        c2w, fovy_deg=40.0, points=np.random.default_rng(0).random((50, 3)) - 0.5
    )
    drawn = [line for line in ax.lines if len(line.get_xdata())]
    assert len(drawn) == 4 * 6  # per camera: 4 edges from the apex, the ring, the up tick
    first = drawn[0]
    assert first.get_color() == "red"
    apex = np.array([first.get_data_3d()[k][0] for k in range(3)])
    np.testing.assert_allclose(apex, c2w[0, :3, 3], atol=1e-6)
    assert all(line.get_color() != "red" for line in drawn[6:])
    assert ax.get_legend().get_texts()[0].get_text().startswith("view 0")


def test_camera_frustums_show_a_mesh_as_its_coloured_surface_in_a_tight_frame():
    c2w = orbit_cameras(5, elevation_deg=10.0, camera_distance=1.9).numpy()
    box = trimesh.creation.box(extents=(1.0, 0.6, 0.2))  # 8 vertices: a few dots before
    box.visual.face_colors = [30, 160, 60, 255]
    ax = plots.plot_camera_frustums(c2w, fovy_deg=40.0, points=box, max_points=500)
    (cloud,) = ax.collections
    n = len(cloud.get_offsets())
    assert n > 400  # surface samples, not the 8 vertices
    colours = np.unique(cloud.get_facecolors()[:, :3], axis=0)  # the mesh's, not grey
    np.testing.assert_allclose(colours, [[30 / 255, 160 / 255, 60 / 255]])
    limits = np.array([ax.get_xlim(), ax.get_ylim(), ax.get_zlim()])  # (3, 2)
    assert np.all(limits[:, 0] <= c2w[:, :3, 3].min(0)) and np.all(
        c2w[:, :3, 3].max(0) <= limits[:, 1]
    )
    assert np.all(limits[:, 0] <= -0.87) and np.all(limits[:, 1] >= 0.87)  # the object's cube
    spans = limits[:, 1] - limits[:, 0]
    assert spans[2] < 0.75 * spans[0]  # a flat ring of cameras gets a flat box, not a cube
    np.testing.assert_allclose(
        ax.get_box_aspect() / ax.get_box_aspect()[0], spans / spans[0], rtol=1e-6
    )


def test_paired_scatter_puts_each_object_at_its_two_scores_and_counts_each_side():
    base = {"chamfer_l1": [0.1, 0.2, 0.3, 0.4], "psnr": [10.0, 12.0, 11.0, 9.0]}
    lora = {"chamfer_l1": [0.05, 0.25, 0.3, math.nan], "psnr": [11.0, 11.0, 11.0, 9.5]}
    records = {
        name: [
            {"chamfer_l1": c, "psnr": p} for c, p in zip(m["chamfer_l1"], m["psnr"], strict=True)
        ]
        for name, m in (("base", base), ("LoRA", lora))
    }
    figure = plots.paired_scatter(records, ("chamfer_l1", "psnr"))
    chamfer, psnr = figure.axes
    np.testing.assert_allclose(
        chamfer.collections[0].get_offsets(), [[0.1, 0.05], [0.2, 0.25], [0.3, 0.3]]
    )
    assert "better on 1, worse on 1 of 3" in chamfer.get_title()  # the NaN object left out
    assert "lower is better: below the line" in chamfer.get_title()
    green, red = matplotlib.colors.to_rgba("tab:green"), matplotlib.colors.to_rgba("tab:red")
    colours = [tuple(c) for c in chamfer.collections[0].get_facecolors()]
    assert colours[0][:3] == green[:3] and colours[1][:3] == red[:3]  # lower Chamfer is better
    assert "better on 2, worse on 1 of 4" in psnr.get_title()  # higher PSNR is better
    (diagonal,) = chamfer.lines
    np.testing.assert_allclose(diagonal.get_xdata(), diagonal.get_ydata())


def test_comparison_grid_titles_and_empty_cells():
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    fig = plots.comparison_grid(
        [[image, image, None], [image, image, image]],
        row_titles=["chair", "mug"],
        col_titles=["input", "target", "prediction"],
    )
    axes = np.array(fig.axes).reshape(2, 3)
    assert [ax.get_title() for ax in axes[0]] == ["input", "target", "prediction"]
    assert axes[1, 0].get_ylabel() == "mug"
    assert len(axes[0, 2].images) == 0 and len(axes[1, 2].images) == 1


def test_metrics_bar_plot_heights_and_error_bars():
    table = {
        "base": {"chamfer": 0.05, "chamfer_stderr": 0.01, "psnr": (18.0, 0.5)},
        "LoRA": {"chamfer": 0.03, "chamfer_stderr": 0.005, "psnr": (21.0, 0.4)},
    }
    fig = report.metrics_bar_plot(table)
    assert [ax.get_title() for ax in fig.axes] == ["chamfer", "psnr"]
    heights = [patch.get_height() for patch in fig.axes[1].patches]
    assert heights == [18.0, 21.0]
    error_segments = fig.axes[0].collections[0].get_segments()
    np.testing.assert_allclose([s[1, 1] - s[0, 1] for s in error_segments], [0.02, 0.01])


def test_benchmark_plot_draws_a_log_log_line_per_group():
    records = [
        {"chunk_size": c, "resolution": r, "seconds": c * r * 1e-6, "peak_memory_mb": c / 10}
        for r in (64, 128)
        for c in (1024, 8192, 65536)
    ]
    fig = plots.benchmark_plot(records, x="chunk_size", group_by="resolution")
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
        assert len(ax.lines) == 2
