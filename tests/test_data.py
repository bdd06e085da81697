"""Renderer, object folders, course layout, dataset and ray sampling on tiny inputs."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from tsr.cameras import orbit_cameras, pixel_to_ray, rays_from_c2w
from tsr.errors import UserInputError
from tsr.preprocess import prepare_images, resize_foreground
from utils.data.build import make_split, prepare_dataset
from utils.data.course_layout import load_course_layout, write_course_layout
from utils.data.dataset import (
    DEPTH_BACKGROUND,
    MultiViewDataset,
    read_object,
    sample_patches,
    sample_rays,
)
from utils.data.meshes import MeshLoadError, load_mesh
from utils.data.prepare_object import CUBE_RADIUS, prepare_object, view_cameras
from utils.data.render_views import render_views
from utils.data.shapes import make_shape
from utils.data.statistics import dataset_statistics

SIZE, FOVY = 48, 40.0


def tilted_cameras(n=3):
    return orbit_cameras(n, elevation_deg=25.0, camera_distance=1.9)


def surface_distance(mesh, points):
    return np.abs(trimesh.proximity.closest_point(mesh, points)[1])


# ---- renderer ------------------------------------------------------------------------------


def test_depth_along_the_tsr_ray_lands_on_the_surface():
    mesh = make_shape("parts", 2, seed=0)  # a flange: holes, creases, several colours
    c2w = tilted_cameras()
    views = render_views(mesh, c2w, FOVY, SIZE)
    rays_o, rays_d = rays_from_c2w(c2w, SIZE, SIZE, FOVY)  # the volume renderer's rays
    hit = views["depth"] != DEPTH_BACKGROUND
    assert 0.05 < hit.mean() < 0.9
    points = rays_o.numpy()[hit] + rays_d.numpy()[hit] * views["depth"][hit][:, None]
    assert surface_distance(mesh, points).max() < 1e-5


def test_depth_of_a_sphere_is_analytic():
    mesh = trimesh.creation.icosphere(subdivisions=5, radius=0.5)
    c2w = tilted_cameras(1)
    depth = render_views(mesh, c2w, FOVY, SIZE)["depth"][0]
    # the centre ray hits the (finely tessellated) sphere head on: 1.9 - 0.5
    centre = depth[SIZE // 2 - 1 : SIZE // 2 + 1, SIZE // 2 - 1 : SIZE // 2 + 1]
    np.testing.assert_allclose(centre, 1.4, atol=2e-3)


def test_alpha_mask_and_depth_agree_and_edges_are_antialiased():
    mesh = make_shape("primitives", 1, seed=0)
    views = render_views(mesh, tilted_cameras(), FOVY, SIZE)
    alpha, depth = views["rgba"][..., 3], views["depth"]
    hit = depth != DEPTH_BACKGROUND
    assert (alpha[hit] > 0).all()  # the centre ray hit: some coverage
    assert hit[alpha == 255].all()  # full coverage: the centre ray hit
    assert (depth[alpha == 0] == DEPTH_BACKGROUND).all()
    partial = (alpha > 0) & (alpha < 255)
    assert partial.sum() > 0 and partial.sum() < 0.2 * (alpha > 0).sum()  # only along edges
    assert np.isfinite(depth).all()


def test_mesh_without_colours_renders_the_untextured_colour_and_colours_show():
    box = trimesh.creation.box(extents=(0.6, 0.6, 0.6))
    rgba = render_views(box, tilted_cameras(1), FOVY, SIZE)["rgba"][0].astype(float)
    inside = rgba[..., 3] == 255
    # light scales all channels alike: the hue of the default colour survives where unclipped
    lit = inside & (rgba[..., 0] < 250)
    np.testing.assert_allclose(rgba[lit, 1] / rgba[lit, 0], 0.55 / 0.9, atol=0.02)
    grey = render_views(box, tilted_cameras(1), FOVY, SIZE, untextured=(0.5, 0.5, 0.5))["rgba"][0]
    assert (grey[inside, 0] == grey[inside, 1]).all() and (grey[inside, 1] == grey[inside, 2]).all()
    box.visual.face_colors = [200, 30, 30, 255]
    rgba = render_views(box, tilted_cameras(1), FOVY, SIZE)["rgba"][0]
    assert (rgba[inside, 0] > 3 * rgba[inside, 1]).all()


def test_subpixel_rays_use_the_same_camera_as_whole_images():
    c2w = tilted_cameras(2)
    rays_o, rays_d = rays_from_c2w(c2w, SIZE, SIZE, FOVY)
    pixels = torch.tensor([[0, 0], [5, 40], [47, 47]])
    o, d = pixel_to_ray(c2w[1], pixels, SIZE, SIZE, FOVY)
    torch.testing.assert_close(d, rays_d[1, pixels[:, 0], pixels[:, 1]])
    torch.testing.assert_close(o, rays_o[1, pixels[:, 0], pixels[:, 1]])


# ---- one object ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flange_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("objects") / "flange"
    prepare_object(make_shape("parts", 2, seed=0), out, n_views=3, size=SIZE, seed=0)
    return out


def test_view0_is_framed_like_inference_preprocessing(flange_dir):
    views = read_object(flange_dir)
    alpha0 = views["rgba"][0, ..., 3] > 0
    rows, cols = np.nonzero(alpha0)
    longer = max(np.ptp(rows), np.ptp(cols)) + 1
    assert 0.85 * SIZE <= longer <= 0.85 * SIZE + 2  # partially covered edge pixels count
    assert abs((rows.min() + rows.max()) / 2 - (SIZE - 1) / 2) <= 1  # centred
    assert abs((cols.min() + cols.max()) / 2 - (SIZE - 1) / 2) <= 1
    np.testing.assert_allclose(views["c2w"][0], orbit_cameras(1, 0.0, 1.9)[0], atol=1e-6)
    meta = views["meta"]
    assert meta["framing"] == "foreground_ratio" and meta["scale"] > 0
    mesh = trimesh.load(flange_dir / "mesh.glb", force="mesh")
    assert mesh.is_watertight and np.abs(mesh.vertices).max() <= CUBE_RADIUS
    np.testing.assert_allclose(mesh.bounds, meta["bounds"], atol=1e-6)


def test_written_depth_lands_on_the_written_mesh(flange_dir):
    views = read_object(flange_dir)
    mesh = trimesh.load(flange_dir / "mesh.glb", force="mesh")
    rays_o, rays_d = rays_from_c2w(torch.from_numpy(views["c2w"]), SIZE, SIZE, views["fovy_deg"])
    hit = views["depth"] > 0
    points = rays_o.numpy()[hit] + rays_d.numpy()[hit] * views["depth"][hit][:, None]
    assert surface_distance(mesh, points).max() < 1e-5


def test_same_seed_same_bytes(tmp_path, flange_dir):
    again = tmp_path / "flange"
    prepare_object(make_shape("parts", 2, seed=0), again, n_views=3, size=SIZE, seed=0)
    files = sorted(p.relative_to(flange_dir) for p in flange_dir.rglob("*") if p.is_file())
    assert len(files) == 3 + 3 + 3  # rgba, depth, cameras/meta/mesh
    for name in files:
        assert (flange_dir / name).read_bytes() == (again / name).read_bytes(), name


def test_existing_objects_are_kept_force_rebuilds_and_nothing_is_half_written(
    tmp_path, monkeypatch
):
    mesh, out = make_shape("primitives", 0, seed=0), tmp_path / "sphere"
    prepare_object(mesh, out, n_views=2, size=32)
    stamp = (out / "meta.json").stat().st_mtime_ns
    prepare_object(mesh, out, n_views=2, size=32)
    assert (out / "meta.json").stat().st_mtime_ns == stamp
    prepare_object(mesh, out, n_views=2, size=32, force=True)
    assert (out / "meta.json").stat().st_mtime_ns != stamp

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(trimesh.Trimesh, "export", crash)
    with pytest.raises(OSError):
        prepare_object(mesh, tmp_path / "crashed", n_views=2, size=32)
    assert not (tmp_path / "crashed").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sphere"]  # no partial folder either
    monkeypatch.undo()
    prepare_object(mesh, tmp_path / "crashed", n_views=2, size=32)  # a rerun completes it
    assert (tmp_path / "crashed" / "meta.json").exists()


def test_object_too_deep_for_the_cube_is_shrunk_and_recorded(tmp_path):
    rod = trimesh.creation.box(extents=(1.0, 0.1, 0.1))  # along view 0's axis
    meta = prepare_object(rod, tmp_path / "rod", n_views=1, size=32)
    assert meta["framing"] == "shrunk_to_cube"
    assert np.abs(meta["bounds"]).max() <= CUBE_RADIUS + 1e-9
    assert meta["view0_foreground_ratio"] < 0.85


def test_unusable_files_raise_a_named_error(tmp_path):
    (tmp_path / "empty.obj").write_text("")
    (tmp_path / "garbage.glb").write_bytes(b"not a gltf file at all")
    trimesh.PointCloud(np.random.default_rng(0).random((20, 3))).export(tmp_path / "points.ply")
    for name in ("empty.obj", "garbage.glb", "points.ply"):
        with pytest.raises(MeshLoadError, match=name):
            load_mesh(tmp_path / name)


def test_y_up_meshes_are_turned_to_z_up(tmp_path):
    tall = trimesh.creation.box(extents=(0.2, 1.0, 0.3))  # tall along y
    tall.export(tmp_path / "tall.stl")
    extents = np.ptp(load_mesh(tmp_path / "tall.stl", up="y").vertices, axis=0)
    np.testing.assert_allclose(extents, (0.3, 0.2, 1.0), atol=1e-6)


# ---- the course project's layout -----------------------------------------------------------


def test_course_layout_round_trip_gives_our_rays_without_flipping(tmp_path):
    mesh = make_shape("parts", 0, seed=1)
    c2w, _, _ = view_cameras(6, np.random.default_rng(0), axis_views=True)  # incl. top, bottom
    views = render_views(mesh, c2w, FOVY, 32)
    write_course_layout(tmp_path / "course", views["rgba"], views["depth"], c2w, FOVY)
    imported = load_course_layout(tmp_path / "course")
    assert imported["fovy_deg"] == pytest.approx(FOVY)
    torch.testing.assert_close(imported["c2w"], c2w, atol=1e-6, rtol=0)
    ours_o, ours_d = rays_from_c2w(imported["c2w"], 32, 32, imported["fovy_deg"])
    torch.testing.assert_close(imported["rays_o"], ours_o, atol=1e-6, rtol=0)
    torch.testing.assert_close(imported["rays_d"], ours_d, atol=1e-6, rtol=0)
    np.testing.assert_allclose(imported["depth"], views["depth"], rtol=1e-5)
    assert (imported["rgba"][..., 3] == views["rgba"][..., 3]).all()
    hit = imported["depth"] > 0
    points = ours_o.numpy()[hit] + ours_d.numpy()[hit] * imported["depth"][hit][:, None]
    assert surface_distance(mesh, points).max() < 1e-4  # depth is float32 z-depth in between
    towards_object = (ours_d[:, 16, 16] * -ours_o[:, 16, 16]).sum(-1)
    assert (towards_object > 0).all()  # every centre ray points at the object: nothing to flip


def test_pyrender_front_camera_becomes_our_view_0(tmp_path):
    folder = tmp_path / "course"
    for sub in ("IMG", "MASK", "Depth"):
        (folder / sub).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "IMG" / "000.png")
    Image.new("L", (8, 8)).save(folder / "MASK" / "000.png")
    np.save(folder / "Depth" / "000.npy", np.zeros((8, 8), np.float32))
    f = 4 / np.tan(np.radians(20))
    # y-up world, camera at +z looking down -z: R = I, T = -R @ centre
    view = {"K": [[f, 0, 4], [0, f, 4], [0, 0, 1]], "R": np.eye(3).tolist(), "T": [0, 0, -1.9]}
    (folder / "cams.json").write_text(json.dumps({"000": view}))
    imported = load_course_layout(folder)
    torch.testing.assert_close(imported["c2w"][0], orbit_cameras(1, 0.0, 1.9)[0], atol=1e-6, rtol=0)
    assert imported["fovy_deg"] == pytest.approx(40.0)


# ---- the dataset ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets") / "tiny"
    prepare_dataset(root, n_objects=4, n_views=4, size=SIZE, seed=0, workers=1)
    return root


def test_dataset_items_match_inference_and_the_volume_renderer(dataset_root):
    dataset = MultiViewDataset(dataset_root, split="all", cond_size=64)
    assert len(dataset) == 4
    item = dataset[0]
    rgba0 = np.asarray(Image.open(dataset_root / item["object_id"] / "rgba" / "000.png"))
    expected = prepare_images(resize_foreground(Image.fromarray(rgba0, mode="RGBA"), 0.85), 64)[0]
    torch.testing.assert_close(item["cond_image"], expected)
    torch.testing.assert_close(item["cond_image"][0, 0], torch.full((3,), 0.5))  # grey background
    assert item["rgb"].shape == (4, SIZE, SIZE, 3) and item["mask"].shape == (4, SIZE, SIZE)
    background = item["mask"] == 0
    assert (item["rgb"][background] == 1).all()  # white, as the volume renderer composites
    assert (item["depth"][background] == 0).all()
    assert item["view_indices"].tolist() == [0, 1, 2, 3]


def test_supervision_views_start_with_view_0_and_follow_the_epoch(dataset_root):
    train = MultiViewDataset(dataset_root, split="train", n_supervision_views=2, cond_size=32)
    first = [train.supervision_views(i, 4) for i in range(len(train))]
    assert first == [train.supervision_views(i, 4) for i in range(len(train))]  # reproducible
    assert all(views[0] == 0 and len(views) == 2 for views in first)
    later = []
    for epoch in range(1, 6):
        train.set_epoch(epoch)
        later += [train.supervision_views(i, 4) for i in range(len(train))]
    assert len({tuple(v) for v in first + later}) > 1  # other views on other epochs
    val = MultiViewDataset(dataset_root, split="val", n_supervision_views=3, cond_size=32)
    assert val.supervision_views(0, 4) == [0, 1, 3]


def test_sampled_rays_are_the_pixels_rays_and_targets(dataset_root):
    item = MultiViewDataset(dataset_root, split="all", cond_size=32)[1]
    batch = sample_rays(item, 500, torch.Generator().manual_seed(0))
    again = sample_rays(item, 500, torch.Generator().manual_seed(0))
    torch.testing.assert_close(batch["rays_d"], again["rays_d"])
    rays_o, rays_d = rays_from_c2w(item["c2w"], SIZE, SIZE, item["fovy_deg"])
    v, (j, i) = batch["view_index"], batch["pixel_ij"].T
    torch.testing.assert_close(batch["rays_o"], rays_o[v, j, i])
    torch.testing.assert_close(batch["rays_d"], rays_d[v, j, i])
    torch.testing.assert_close(batch["rgb"], item["rgb"][v, j, i])
    torch.testing.assert_close(batch["depth"], item["depth"][v, j, i])


def test_patches_are_crops_of_the_views(dataset_root):
    item = MultiViewDataset(dataset_root, split="all", cond_size=32)[2]
    patches = sample_patches(item, 16, 16, torch.Generator().manual_seed(0))
    assert patches["rgb"].shape == (16, 16, 16, 3) and patches["mask"].shape == (16, 16, 16)
    _, rays_d = rays_from_c2w(item["c2w"], SIZE, SIZE, item["fovy_deg"])
    for p in range(16):
        v, (top, left) = patches["view_index"][p], patches["top_left"][p].tolist()
        crop = (v, slice(top, top + 16), slice(left, left + 16))
        torch.testing.assert_close(patches["rays_d"][p], rays_d[crop])
        torch.testing.assert_close(patches["mask"][p], item["mask"][crop])
        torch.testing.assert_close(patches["rgb"][p], item["rgb"][crop])
    with pytest.raises(ValueError, match="patch_size"):
        sample_patches(item, 1, SIZE + 1)


def test_patches_find_a_small_object():
    mask = torch.zeros(2, 64, 64)
    mask[:, 50:56, 4:10] = 1.0  # a 6x6 object near a corner
    item = {"mask": mask, "rgb": torch.ones(2, 64, 64, 3), "depth": mask * 1.5,
            "c2w": tilted_cameras(2), "fovy_deg": FOVY}  # fmt: skip
    biased = sample_patches(item, 64, 8, torch.Generator().manual_seed(0), object_bias=1.0)
    assert (biased["mask"].flatten(1).amax(dim=1) > 0).all()  # every patch sees the object
    uniform = sample_patches(item, 64, 8, torch.Generator().manual_seed(0), object_bias=0.0)
    assert (uniform["mask"].flatten(1).amax(dim=1) > 0).float().mean() < 0.2


def test_split_is_seeded_disjoint_complete_and_stratified():
    families = {f"{f}_{i}": f for f in ("a", "b") for i in range(10)}
    split = make_split(families, seed=5)
    assert split == make_split(families, seed=5) and split != make_split(families, seed=6)
    ids = split["train"] + split["val"] + split["test"]
    assert sorted(ids) == sorted(families) and len(set(ids)) == 20
    assert {families[i] for i in split["test"]} == {"a", "b"}


def test_statistics_describe_the_dataset(dataset_root):
    stats = dataset_statistics(dataset_root)
    summary = stats["summary"]
    assert summary["n_objects"] == 4 and summary["n_images"] == 16
    assert summary["family"] == {"parts": 2, "primitives": 2}
    assert sum(summary["split"].values()) == 4 and summary["watertight"] == 4
    assert len(stats["objects"]) == 4
    assert all(0 < row["foreground_fraction"] < 1 for row in stats["objects"])
    assert summary["max_abs_coordinate_mean_min_max"][2] <= CUBE_RADIUS
    with pytest.raises(UserInputError, match=r"prepare_data\.py"):
        MultiViewDataset(Path(dataset_root) / "missing")


def test_occupancy_labels_match_an_analytic_sphere(tmp_path):
    from utils.data.dataset import MultiViewDataset
    from utils.data.prepare_object import occupancy_samples
    from utils.data.render_views import Shader

    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.5)
    grey = np.array([0.7, 0.7, 0.7])
    samples, labels = occupancy_samples(
        sphere, 2000, np.random.default_rng(0), Shader(sphere, untextured=grey)
    )
    assert labels == {"method": "ray parity", "ambiguous_share": 0.0}  # watertight: exact
    points = samples["points"].astype(np.float32)
    assert points.shape == (2000, 3) and np.abs(points).max() <= 0.87
    distance = np.linalg.norm(points, axis=1)
    clear = np.abs(distance - 0.5) > 0.01  # tessellation moves the surface by < 0.01
    np.testing.assert_array_equal(samples["inside"][clear], distance[clear] < 0.5)
    assert 0.2 < samples["inside"].mean() < 0.8  # near-surface points on both sides
    # signed distances: |p| - 0.5 up to the tessellation and the dense samples' spacing
    sdf = samples["sdf"].astype(np.float32)
    error = np.abs(sdf - (distance - 0.5))
    assert error.mean() < 0.003 and np.percentile(error, 99) < 0.012, error.max()
    assert (np.sign(sdf[clear]) == np.where(samples["inside"][clear], -1, 1)).all()
    # colours: the given grey, shaded by the fixed lights, bright where the key light faces
    from utils.data.render_views import LIGHTS

    colour = samples["colour"].astype(np.float32) / 255
    key = np.asarray(LIGHTS[0][0]) / np.linalg.norm(LIGHTS[0][0])
    facing = points @ key / distance
    assert np.allclose(colour[:, 0], colour[:, 1], atol=2 / 255)  # grey stays grey
    assert colour[facing > 0.9, 0].mean() > grey[0] * 0.85 > colour[facing < -0.9, 0].mean()

    from utils.data.build import prepare_dataset

    prepare_dataset(
        tmp_path / "set", ("primitives",), 3, n_views=2, size=32, occupancy_points=64, workers=1
    )
    item = MultiViewDataset(tmp_path / "set", "train", cond_size=32)[0]
    assert item["occupancy_points"].shape == (64, 3) and item["occupancy"].shape == (64,)
    assert item["occupancy_sdf"].shape == (64,) and item["occupancy_colour"].shape == (64, 3)
    assert ((item["occupancy_sdf"] < 0) == (item["occupancy"] > 0.5)).all()


def test_the_dataset_reader_imports_no_builder_libraries():
    """The reader pulls in neither the CAD kernel nor the ray casters, and training and
    evaluation import on a machine that has neither installed (trimesh imports them only
    when present)."""
    heavy = "('manifold3d', 'embreex', 'rtree')"
    reader = (
        "import sys, utils.data.dataset; print(sorted(m for m in sys.modules if "
        f"m.split('.')[0] in {heavy} or m.startswith('trimesh.ray')))"
    )
    without = (
        f"import sys; sys.modules.update(dict.fromkeys({heavy})); "  # None: import fails
        "import utils.data.dataset, utils.training.train, utils.evaluation.evaluate; print('ok')"
    )
    for probe, expected in ((reader, "[]"), (without, "ok")):
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
        assert result.stdout.strip() == expected, result.stdout + result.stderr
