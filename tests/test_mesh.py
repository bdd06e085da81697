"""Mesh extraction on analytic fields and on the official reference volume."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import mcubes
import numpy as np
import pytest
import torch
import trimesh
from scipy.spatial import cKDTree

from tsr import marching_cubes as mc
from tsr import mesh, mesh_cost
from tsr.marching_cubes import available_backends, marching_cubes
from tsr.mesh import build_trimesh, extract_isosurface, grid_axis

REFERENCE = Path(__file__).parent / "fixtures" / "triposr" / "tiny_s0_ref.npz"
RADIUS = 0.87
CPU_BACKENDS = [b for b in ("torch", "pymcubes", "skimage") if b in available_backends()]
CENTRE = (0.1, -0.05, 0.03)


# Analytic fields, positive inside, surface at 0.
def sphere(p: torch.Tensor, radius: float = 0.5) -> torch.Tensor:
    return radius - (p - p.new_tensor(CENTRE)).norm(dim=-1)


def ellipsoid(p: torch.Tensor) -> torch.Tensor:
    axes = p.new_tensor([0.6, 0.35, 0.45])
    return 1.0 - (((p - p.new_tensor([-0.05, 0.08, 0.0])) / axes) ** 2).sum(-1)


def torus(p: torch.Tensor) -> torch.Tensor:
    ring = p[:, :2].norm(dim=-1) - 0.45
    return 0.15 - torch.sqrt(ring**2 + p[:, 2] ** 2)


def blobs(p: torch.Tensor) -> torch.Tensor:
    centres = p.new_tensor(
        [[0.25, 0.1, 0.0], [-0.3, 0.0, 0.1], [0.0, -0.3, -0.2], [0.05, 0.3, 0.3]]
    )
    sigmas = p.new_tensor([0.18, 0.22, 0.15, 0.12])
    d2 = ((p[:, None, :] - centres) ** 2).sum(-1)  # (N, 4)
    return torch.exp(-d2 / (2 * sigmas**2)).sum(-1) - 0.5


SMOOTH_FIELDS = {"sphere": sphere, "ellipsoid": ellipsoid, "torus": torus, "blobs": blobs}


# Fields with parts smaller than a coarse cell (4 voxels), each with a Lipschitz bound derived
# by hand: a ball's `r - |p - c|` changes by at most 1 per world unit, so do max/min of such.
SMALL_PARTS_RESOLUTION = 64


def grid_point(i: int, j: int, k: int, resolution: int = SMALL_PARTS_RESOLUTION) -> torch.Tensor:
    return torch.tensor([i, j, k], dtype=torch.float32) * voxel(resolution) - RADIUS


def floaters(p: torch.Tensor) -> torch.Tensor:
    """A ball and three islands 1.2 voxels across between coarse samples (index 4n + 2), each
    holding one grid point 0.3 voxels from its centre. Lipschitz bound 1."""
    size = voxel(SMALL_PARTS_RESOLUTION)
    centres = torch.stack([grid_point(*ijk) for ijk in ((10, 50, 42), (54, 6, 18), (30, 58, 10))])
    centres = centres.to(p) + 0.3 * size / 3**0.5
    islands = (0.6 * size - (p[:, None] - centres).norm(dim=-1)).amax(1)
    return torch.maximum(sphere(p, 0.35), islands)


def thin_parts(p: torch.Tensor) -> torch.Tensor:
    """A plate one grid plane thick (z index 38, 0.2 voxels off it) and a spherical shell 1.2
    voxels thick. Lipschitz bound 1."""
    size = voxel(SMALL_PARTS_RESOLUTION)
    plate = 0.5 * size - (p[:, 2] - (float(grid_point(0, 0, 38)[2]) + 0.2 * size)).abs()
    shell = 0.6 * size - ((p - p.new_tensor([0.0, 0.1, -0.2])).norm(dim=-1) - 0.45).abs()
    return torch.maximum(plate, shell)


LUMP_AMPLITUDE, LUMP_FREQUENCY = 0.04, 25.0


def lumpy(p: torch.Tensor) -> torch.Tensor:
    """A ball dented by a 3-d sine product, plus the floaters. The product's gradient is at
    most a*k*sqrt(3), so the bound is 1 + a*k*sqrt(3)."""
    bumps = torch.sin(LUMP_FREQUENCY * p).prod(dim=-1) * LUMP_AMPLITUDE
    return torch.maximum(sphere(p, 0.45) + bumps, floaters(p))


SMALL_PART_FIELDS = {  # name: (field, Lipschitz bound)
    "floaters": (floaters, 1.0),
    "thin_parts": (thin_parts, 1.0),
    "lumpy": (lumpy, 1.0 + LUMP_AMPLITUDE * LUMP_FREQUENCY * 3**0.5),
}


@pytest.fixture(autouse=True)
def _slow_only_when_asked(request):
    # A plain `pytest tests/test_mesh.py` stays under a minute; `-m slow` runs these too.
    asked = "slow" in (request.config.getoption("markexpr") or "")
    if request.node.get_closest_marker("slow") and not asked:
        pytest.skip("slow (minutes on 2 cores): run with -m slow, as make test-slow does")


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(REFERENCE))


def reference_field(reference):
    """The official 32^3 density volume as a density_fn defined on its grid points."""
    resolution = 32
    axis = grid_axis(resolution, RADIUS)
    density = torch.from_numpy(reference["grid_density_act"])  # (R^3,), x slowest

    def density_fn(points: torch.Tensor) -> torch.Tensor:
        ijk = torch.searchsorted(axis, points.contiguous())  # exact: points are grid planes
        assert torch.equal(axis[ijk], points)
        return density[(ijk[:, 0] * resolution + ijk[:, 1]) * resolution + ijk[:, 2]]

    return density_fn


def voxel(resolution: int) -> float:
    return 2 * RADIUS / (resolution - 1)


def same_surface(a: mesh.MeshExtraction, b: mesh.MeshExtraction, atol: float = 1e-6) -> None:
    """Same vertices (any order) and the same oriented triangles."""
    assert a.verts.shape == b.verts.shape and a.faces.shape == b.faces.shape
    distance, b_index_of_a = cKDTree(b.verts).query(a.verts)
    assert distance.max() <= atol
    assert len(np.unique(b_index_of_a)) == len(b_index_of_a)

    def canonical(faces: np.ndarray) -> set[tuple[int, int, int]]:
        roll = np.argmin(faces, axis=1)  # start each triangle at its smallest index
        rows = np.arange(len(faces))[:, None]
        return set(map(tuple, faces[rows, (roll[:, None] + np.arange(3)) % 3].tolist()))

    assert canonical(b_index_of_a[a.faces]) == canonical(b.faces)


def hausdorff(a: np.ndarray, b: np.ndarray) -> float:
    return max(cKDTree(b).query(a)[0].max(), cKDTree(a).query(b)[0].max())


def assert_closed_outward(extraction: mesh.MeshExtraction, centre) -> None:
    surface = trimesh.Trimesh(extraction.verts, extraction.faces, process=False)
    assert surface.is_watertight
    assert surface.volume > 0
    outward = ((surface.triangles_center - np.asarray(centre)) * surface.face_normals).sum(-1)
    assert (outward > 0).all()


# The grid and the queries.
def test_grid_is_officials_and_queried_in_bounded_chunks():
    resolution, chunk_size = 7, 50
    calls = []

    def recording(points):
        calls.append((points.clone(), torch.is_inference_mode_enabled()))
        return sphere(points)

    extract_isosurface(recording, resolution, 0.0, method="dense", chunk_size=chunk_size)
    # TripoSR's grid: linspace(0, 1, R), meshgrid "ij" (x slowest), scaled to [-r, r].
    unit = torch.linspace(0, 1, resolution)
    official = torch.stack(torch.meshgrid(unit, unit, unit, indexing="ij"), -1).reshape(-1, 3)
    official = official * (RADIUS - -RADIUS) + -RADIUS
    assert torch.equal(torch.cat([points for points, _ in calls]), official)
    assert max(len(points) for points, _ in calls) <= chunk_size  # split at x-slab edges
    assert all(inference for _, inference in calls)
    assert all(points.dtype == torch.float32 for points, _ in calls)


def test_chunk_size_does_not_change_the_mesh():
    for method in ("dense", "coarse_to_fine"):
        runs = [
            extract_isosurface(torus, 40, 0.0, method=method, chunk_size=size)
            for size in (0, 777, 4096, 1 << 20)
        ]
        for run in runs[1:]:
            assert np.array_equal(run.verts, runs[0].verts)
            assert np.array_equal(run.faces, runs[0].faces)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown method"):
        extract_isosurface(sphere, 8, 0.0, method="octree")
    with pytest.raises(ValueError, match="coarse_step"):
        extract_isosurface(sphere, 8, 0.0, method="coarse_to_fine", coarse_step=0)


def test_density_fn_must_return_one_value_per_point():
    with pytest.raises(ValueError, match="one density per point"):
        extract_isosurface(lambda p: p, 8, 0.0)


# Parity with the official implementation.
def test_pymcubes_matches_official_output(reference):
    verts, faces = marching_cubes(
        reference["grid_density_act"].reshape(32, 32, 32), reference["mc_threshold"], "pymcubes"
    )
    world = torch.from_numpy(verts) / (32 - 1.0) * (2 * RADIUS) + -RADIUS
    assert np.array_equal(world.numpy(), reference["mc_raw_verts"])
    assert np.array_equal(faces, reference["mc_raw_faces"])


def test_extract_and_trimesh_match_official_mesh(reference):
    extraction = extract_isosurface(
        reference_field(reference), 32, float(reference["mc_threshold"]), backend="pymcubes"
    )
    assert extraction.method == "dense" and extraction.n_queries == 32**3
    assert np.array_equal(extraction.verts, reference["mc_raw_verts"])
    assert np.array_equal(extraction.faces, reference["mc_raw_faces"])
    surface = build_trimesh(extraction.verts, extraction.faces)
    n_verts, n_faces = reference["mesh_counts"][:2]
    assert (len(surface.vertices), len(surface.faces)) == (n_verts, n_faces)
    assert np.array_equal(surface.vertices, reference["mesh_verts"])
    assert np.array_equal(surface.faces, reference["mesh_faces"])


def test_blocks_weld_to_the_official_mesh(reference):
    # A rough random field: every seam has many crossings, none of them may be left open.
    threshold = float(reference["mc_threshold"])
    field = reference_field(reference)
    whole = extract_isosurface(field, 32, threshold, backend="pymcubes", method="dense")
    for cells in (8, 13):
        blocks = extract_isosurface(
            field, 32, threshold, backend="pymcubes", method="blocks", block_resolution=cells
        )
        assert blocks.n_blocks == -((-31 // cells) ** 3)
        same_surface(blocks, whole)


# Backends.
def test_backend_choice_and_errors(monkeypatch):
    assert set(available_backends()) <= set(mc.BACKENDS)
    assert mc.resolve_backend("auto") == available_backends()[0]
    with pytest.raises(ValueError, match="unknown marching-cubes backend"):
        mc.resolve_backend("vtk")
    monkeypatch.setitem(sys.modules, "torchmcubes", None)  # makes the import fail
    mc._backend_module.cache_clear()
    try:
        with pytest.raises(ImportError, match="pip install"):
            mc.resolve_backend("torchmcubes")
    finally:
        mc._backend_module.cache_clear()


def test_torchmcubes_conventions_are_converted(monkeypatch):
    """A stand-in with torchmcubes' documented conventions gives PyMCubes' (official) mesh."""

    def torchmcubes_like(volume: torch.Tensor, threshold: float):
        # Reads volume[z][y][x], returns vertices as (x, y, z) = (dim2, dim1, dim0).
        verts, faces = mcubes.marching_cubes(volume.numpy(), threshold)
        return torch.from_numpy(verts[:, ::-1].copy()).float(), torch.from_numpy(
            faces.astype(np.int64)
        )

    module = types.SimpleNamespace(marching_cubes=torchmcubes_like)
    monkeypatch.setitem(sys.modules, "torchmcubes", module)
    mc._backend_module.cache_clear()
    try:
        assert available_backends()[0] == "torchmcubes"
        fake = extract_isosurface(ellipsoid, 24, 0.0, backend="auto")
    finally:
        mc._backend_module.cache_clear()
    official = extract_isosurface(ellipsoid, 24, 0.0, backend="pymcubes")
    assert fake.backend == "torchmcubes"
    assert np.array_equal(fake.verts, official.verts) and np.array_equal(fake.faces, official.faces)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sphere_is_closed_outward_and_the_right_size(backend):
    resolution = 48
    extraction = extract_isosurface(sphere, resolution, 0.0, backend=backend)
    assert_closed_outward(extraction, CENTRE)
    distance = np.linalg.norm(extraction.verts - np.asarray(CENTRE), axis=1)
    assert np.abs(distance - 0.5).max() < voxel(resolution)
    assert np.abs(extraction.verts).max() <= RADIUS


def test_skimage_surface_is_close_to_pymcubes(reference):
    if "skimage" not in available_backends():
        pytest.skip("scikit-image is not installed")
    for field, resolution, threshold in (
        (blobs, 40, 0.0),
        (reference_field(reference), 32, float(reference["mc_threshold"])),
    ):
        area = {}
        for backend in ("pymcubes", "skimage"):
            extraction = extract_isosurface(field, resolution, threshold, backend=backend)
            surface = trimesh.Trimesh(extraction.verts, extraction.faces, process=False)
            area[backend], volume = surface.area, surface.volume
            assert volume > 0  # outward for both
        assert area["skimage"] == pytest.approx(area["pymcubes"], rel=0.03)


def test_inside_must_be_above_the_threshold():
    # An inverted field (inside below the threshold) gives an inside-out mesh: not our convention.
    inverted = extract_isosurface(lambda p: -sphere(p), 32, 0.0)
    assert trimesh.Trimesh(inverted.verts, inverted.faces, process=False).volume < 0


def test_vertices_stay_in_the_box():
    # A sphere larger than the box is cut open by the grid boundary; radius 0.5 box here.
    extraction = extract_isosurface(lambda p: sphere(p, 0.6), 32, 0.0, radius=0.5)
    assert len(extraction.faces) > 0
    assert extraction.verts.min() >= -0.5 and extraction.verts.max() <= 0.5


# Empty surfaces.
@pytest.mark.parametrize(
    ("threshold", "words"), [(2.0, "above the whole field"), (-2.0, "below the whole field")]
)
@pytest.mark.parametrize("method", ["dense", "blocks", "coarse_to_fine", "certified"])
def test_empty_surface_warns_and_gives_an_empty_mesh(threshold, words, method):
    with pytest.warns(UserWarning, match=words):
        extraction = extract_isosurface(
            sphere, 24, threshold, method=method, block_resolution=8, lipschitz=1.0
        )
    assert extraction.is_empty
    assert extraction.verts.shape == (0, 3) and extraction.faces.shape == (0, 3)

    def never(points):
        raise AssertionError("color_fn called on an empty mesh")

    surface = build_trimesh(extraction.verts, extraction.faces, color_fn=never)
    assert len(surface.vertices) == 0 and len(surface.faces) == 0


def test_build_trimesh_stores_queried_colours_as_rgba():
    extraction = extract_isosurface(sphere, 24, 0.0)
    surface = build_trimesh(extraction.verts, extraction.faces, lambda p: (p + RADIUS) / 2 / RADIUS)
    colours = surface.visual.vertex_colors
    assert colours.dtype == np.uint8 and colours.shape == (len(surface.vertices), 4)
    expected = (surface.vertices + RADIUS) / 2 / RADIUS * 255
    assert np.abs(colours[:, :3] - expected).max() <= 1
    assert (colours[:, 3] == 255).all()


# Blocks and coarse-to-fine.
@pytest.mark.parametrize("cells", [8, 11])
def test_blocks_equal_one_volume(cells):
    resolution = 40
    whole = extract_isosurface(sphere, resolution, 0.0, method="dense")
    blocks = extract_isosurface(sphere, resolution, 0.0, method="blocks", block_resolution=cells)
    assert blocks.n_blocks > 1
    same_surface(blocks, whole)
    assert_closed_outward(blocks, CENTRE)
    refined = extract_isosurface(torus, resolution, 0.0, method="coarse_to_fine")
    refined_blocks = extract_isosurface(
        torus, resolution, 0.0, method="coarse_to_fine", block_resolution=cells
    )
    same_surface(refined_blocks, refined)


def test_blocks_weld_where_the_field_equals_the_threshold_on_a_seam():
    # An integer-valued ball: many grid points lie exactly on the surface, several on seams.
    resolution = 33

    def integer_ball(points):
        ijk = torch.round((points + RADIUS) / (2 * RADIUS) * (resolution - 1))
        return 100.0 - ((ijk - 16) ** 2).sum(-1)

    whole = extract_isosurface(integer_ball, resolution, 0.0, backend="pymcubes")
    blocks = extract_isosurface(
        integer_ball, resolution, 0.0, backend="pymcubes", block_resolution=8
    )
    assert blocks.n_blocks == 64
    # One volume keeps coincident vertices there (as TripoSR); blocks make them distinct.
    assert (len(blocks.verts), len(blocks.faces)) == (len(whole.verts), len(whole.faces))
    assert hausdorff(blocks.verts, whole.verts) <= 1e-4 * voxel(resolution)
    assert trimesh.Trimesh(blocks.verts, blocks.faces, process=False).is_watertight


def test_auto_switches_to_blocks_for_large_volumes(monkeypatch):
    assert extract_isosurface(sphere, 24, 0.0).method == "dense"
    monkeypatch.setattr(mesh, "AUTO_DENSE_MAX_BYTES", 4 * 20**3)
    assert extract_isosurface(sphere, 24, 0.0, progress=True).method == "blocks"
    # 128-cell blocks: 2^3 of them at 140^3.
    certified = extract_isosurface(sphere, 140, 0.0, lipschitz=1.0, chunk_size=1 << 16)
    assert (certified.method, certified.n_blocks) == ("certified", 8)


# Certified: only near the surface, with the dense mesh.
def test_auto_is_certified_only_with_a_lipschitz_bound():
    assert extract_isosurface(sphere, 24, 0.0, lipschitz=1.0).method == "certified"
    assert extract_isosurface(sphere, 24, 0.0).method == "dense"
    with pytest.raises(ValueError, match="needs lipschitz"):
        extract_isosurface(sphere, 24, 0.0, method="certified")
    with pytest.raises(ValueError, match="positive bound"):
        extract_isosurface(sphere, 24, 0.0, lipschitz=0.0)


@pytest.mark.parametrize("name", SMALL_PART_FIELDS)
def test_certified_keeps_every_island_and_thin_part(name):
    field, bound = SMALL_PART_FIELDS[name]
    resolution = SMALL_PARTS_RESOLUTION
    dense = extract_isosurface(field, resolution, 0.0, method="dense")
    certified = extract_isosurface(field, resolution, 0.0, lipschitz=bound)
    # Unqueried points only lie where no edge crosses: one volume gives the same arrays.
    assert certified.method == "certified"
    assert np.array_equal(certified.verts, dense.verts)
    assert np.array_equal(certified.faces, dense.faces)
    assert certified.n_queries <= 0.6 * dense.n_queries
    # The fields do test something: the unproven coarse-to-fine loses parts of each.
    refined = extract_isosurface(field, resolution, 0.0, method="coarse_to_fine")
    assert len(refined.faces) < len(dense.faces)


@pytest.mark.parametrize("cells", [16, 21])
def test_certified_blocks_equal_dense_blocks(cells):
    field, bound = SMALL_PART_FIELDS["lumpy"]
    resolution = SMALL_PARTS_RESOLUTION
    dense = extract_isosurface(field, resolution, 0.0, block_resolution=cells)
    certified = extract_isosurface(field, resolution, 0.0, lipschitz=bound, block_resolution=cells)
    assert certified.n_blocks == dense.n_blocks > 1
    same_surface(certified, dense)


def test_certified_queries_a_thin_band_around_the_surface():
    # A distance field (bound 1) at 128^3: cells within about one cell diagonal of the
    # surface stay unproven, a band some 12 voxels thick; the rest is proven from corners.
    resolution = 128
    certified = extract_isosurface(sphere, resolution, 0.0, lipschitz=1.0, chunk_size=1 << 16)
    surface_voxels = 4 * np.pi * (0.5 / voxel(resolution)) ** 2
    assert certified.n_queries < 12 * surface_voxels < 0.1 * resolution**3


def _part_image(seed: int) -> np.ndarray:
    """A few coloured boxes on black, different per seed: a part-like input."""
    rng = np.random.default_rng(seed)
    image = np.zeros((96, 96, 3), np.uint8)
    for _ in range(3):
        top, left = rng.integers(10, 50, 2)
        height, width = rng.integers(12, 40, 2)
        image[top : top + height, left : left + width] = rng.integers(60, 255, 3)
    return image


@pytest.fixture
def recorded_extractions(monkeypatch):
    """The MeshExtraction of every TSR.extract_mesh call, to see the method and queries."""
    from tsr import model as tsr_model

    records = []

    def recording(*args, **kwargs):
        records.append(extract_isosurface(*args, **kwargs))
        return records[-1]

    monkeypatch.setattr(tsr_model.mesh_extraction, "extract_isosurface", recording)
    return records


@pytest.mark.parametrize(
    ("model_name", "resolution", "seed"),
    [("classroom", 64, 0), ("classroom", 96, 1), ("classroom", 128, 2), ("tiny", 64, 3),
     ("random-classroom", 64, 4)],
)  # fmt: skip
def test_models_default_extraction_is_the_dense_mesh(
    model_name, resolution, seed, recorded_extractions
):
    """The default ("auto": a band around the surface) gives the dense mesh: the trained
    model on part-like inputs, and random weights cut at their 90th percentile (they never
    reach 25), whose flat, noisy field makes the band query every point."""
    from tsr import TSR

    if model_name == "random-classroom":
        model = TSR.from_config(TSR.from_pretrained("classroom").config, seed=seed)
    else:
        model = TSR.from_pretrained(model_name)
    with torch.no_grad():
        codes = model([_part_image(seed)])
        threshold = model.config.mc_threshold
        if model_name != "classroom":
            points = torch.rand(4096, 3, generator=torch.Generator().manual_seed(0)) * 1.74 - 0.87
            density = model.renderer.query_triplane(model.decoder, points, codes[0])
            threshold = float(density["density_act"].quantile(0.9))
    default = model.extract_mesh(codes, False, resolution=resolution, threshold=threshold)[0]
    dense = model.extract_mesh(codes, False, resolution, threshold, method="dense")[0]
    band, full = recorded_extractions
    assert band.method == "band"
    if model_name == "classroom":
        assert band.n_queries < 0.6 * full.n_queries
    else:  # a random decoder's field is flat noise: every point is queried, once
        assert band.n_queries == full.n_queries
    assert len(dense.faces) > 100
    assert np.array_equal(default.vertices, dense.vertices)
    assert np.array_equal(default.faces, dense.faces)


@pytest.mark.parametrize(
    ("resolution", "plane_size", "step"),
    [(256, 64, 2), (512, 64, 4), (128, 64, 1), (1024, 64, 4), (128, 16, 4), (64, 16, 2)],
)
def test_band_step_is_about_half_a_texel(resolution, plane_size, step):
    from tsr.model import surface_band, surface_coarse_step

    assert surface_coarse_step(resolution, plane_size) == step
    assert surface_band(resolution, plane_size, 25.0)["method"] == (
        "dense" if step == 1 else "band"
    )
    assert surface_band(resolution, plane_size, 0.0)["method"] == "dense"  # no log of 0
    assert surface_band(resolution, plane_size, 25.0, "blocks")["method"] == "blocks"


# The band's margin on fields whose log-density has a known slope k (world units): a point of
# an unselected cell is within half a cell diagonal h of a corner whose log-density is at
# least log_margin from the threshold's, so a slope k <= log_margin / h proves the band exact.
def _log_density_field(field, slope: float):
    """exp(slope * field): positive, threshold 1 where field = 0, log-slope = slope * bound."""
    return lambda p: torch.exp(slope * field(p))


@pytest.mark.parametrize("name", SMALL_PART_FIELDS)
def test_band_keeps_every_island_when_the_margin_covers_the_slope(name):
    field, bound = SMALL_PART_FIELDS[name]
    resolution, step, log_margin = SMALL_PARTS_RESOLUTION, 4, 2.0
    half_diagonal = 3**0.5 * step * voxel(resolution) / 2
    exact = _log_density_field(field, log_margin / half_diagonal / bound)
    dense = extract_isosurface(exact, resolution, 1.0, method="dense")
    band = extract_isosurface(exact, resolution, 1.0, coarse_step=step, margin=0, log_margin=2.0)
    assert band.method == "band"
    assert np.array_equal(band.verts, dense.verts)
    assert np.array_equal(band.faces, dense.faces)
    assert band.n_queries <= 0.6 * dense.n_queries
    # A margin, not a proof: a field 8x steeper than it covers loses parts, as coarse_to_fine.
    steep = _log_density_field(field, 8 * log_margin / half_diagonal / bound)
    dense = extract_isosurface(steep, resolution, 1.0, method="dense")
    band = extract_isosurface(steep, resolution, 1.0, coarse_step=step, margin=0, log_margin=2.0)
    assert len(band.faces) < len(dense.faces)


def test_band_of_a_field_lumpy_at_the_coarse_scale_is_the_dense_grid():
    """The trained decoder on a random triplane x 10: noise with islands smaller than a
    coarse cell, where the margin missed one (seeds and scales of benchmarks/bench_band.py's
    search). Such a band covers most cells, so every point is queried."""
    from tsr import TSR

    model = TSR.from_pretrained("classroom")
    channels, size = model.config.decoder.in_channels // 3, 2 * model.config.tokenizer.plane_size
    code = torch.randn(3, channels, size, size, generator=torch.Generator().manual_seed(2)) * 10

    def density(points: torch.Tensor) -> torch.Tensor:
        return model.renderer.query_triplane(model.decoder, points, code)["density_act"][:, 0]

    with torch.no_grad():
        points = torch.rand(20000, 3, generator=torch.Generator().manual_seed(2)) * 1.74 - 0.87
        threshold = float(density(points).quantile(0.9))
        dense = extract_isosurface(density, 64, threshold, method="dense")
        band = extract_isosurface(density, 64, threshold, coarse_step=2, log_margin=2.0)
    assert np.array_equal(band.verts, dense.verts)
    assert np.array_equal(band.faces, dense.faces)
    assert band.n_queries == dense.n_queries  # the coarse grid, then every other point


def test_band_needs_a_positive_threshold_and_margin():
    with pytest.raises(ValueError, match="positive threshold"):
        extract_isosurface(sphere, 24, 0.0, log_margin=1.0)
    with pytest.raises(ValueError, match="log_margin >= 0"):
        extract_isosurface(sphere, 24, 1.0, log_margin=-1.0)
    with pytest.raises(ValueError, match="needs log_margin"):
        extract_isosurface(sphere, 24, 1.0, method="band")
    assert extract_isosurface(lambda p: sphere(p) + 1, 24, 1.0, log_margin=1.0).method == "band"


# Our torch marching cubes against PyMCubes.
def oriented_faces(faces: np.ndarray) -> list[tuple[int, int, int]]:
    roll = np.argmin(faces, axis=1)  # each triangle from its smallest index, winding kept
    rows = np.arange(len(faces))[:, None]
    return sorted(map(tuple, faces[rows, (roll[:, None] + np.arange(3)) % 3].tolist()))


def triangle_corners(verts: np.ndarray, faces: np.ndarray) -> list[tuple]:
    """Each triangle as its corner positions (rounded to 1e-9), from its smallest corner."""
    corners = [tuple(map(tuple, np.round(verts[face], 9))) for face in faces.astype(np.int64)]
    first = [min(range(3), key=c.__getitem__) for c in corners]
    return sorted(c[i:] + c[:i] for c, i in zip(corners, first, strict=True))


def test_torch_marching_cubes_gives_pymcubes_triangles(reference):
    rng = np.random.default_rng(0)
    integer_ball = 30.0 - ((np.indices((13, 13, 13)) - 6) ** 2).sum(0)  # many exact zeros
    volumes = [
        reference["grid_density_act"].reshape(32, 32, 32) - reference["mc_threshold"],
        rng.standard_normal((9, 14, 5)),  # every case, odd sizes
        integer_ball,
        np.ones((4, 4, 4)),  # no surface
    ]
    for volume in volumes:
        level = torch.from_numpy(volume.astype(np.float32))
        verts, faces = mc.marching_cubes_level(level, "torch")
        expected_verts, expected_faces = mcubes.marching_cubes(level.numpy(), 0.0)
        assert verts.shape == expected_verts.shape and faces.shape == expected_faces.shape
        if len(faces) == 0:
            continue
        # The same triangles, wound the same way (outward), with the same (x, y, z) corners
        # in grid units, to rounding. Compared by position: where the level is exactly 0,
        # several edges put their vertex on one grid point.
        assert triangle_corners(verts, faces) == triangle_corners(expected_verts, expected_faces)


def test_torch_backend_world_coordinates_match_pymcubes():
    ours = extract_isosurface(blobs, 40, 0.0, backend="torch")
    theirs = extract_isosurface(blobs, 40, 0.0, backend="pymcubes")
    assert ours.backend == "torch"
    distance, index = cKDTree(theirs.verts).query(ours.verts)
    assert distance.max() <= 1e-6  # float32 world coordinates
    assert oriented_faces(index[ours.faces]) == oriented_faces(theirs.faces)


# Estimates before long extractions.
def test_long_extractions_warn_with_their_estimate(monkeypatch):
    monkeypatch.setattr(mesh_cost, "WARN_ABOVE_SECONDS", 0.0)
    with pytest.warns(UserWarning, match=r"24\^3 grid \(dense, one volume\): about 13,824 density"):
        extract_isosurface(sphere, 24, 0.0)
    with pytest.warns(UserWarning, match=r"\(certified, one volume\): about [\d,]+ density"):
        extract_isosurface(sphere, 24, 0.0, lipschitz=1.0)
    monkeypatch.setattr(mesh_cost, "WARN_ABOVE_SECONDS", 1e9)
    monkeypatch.setattr(mesh_cost, "WARN_ABOVE_MEMORY_SHARE", 0.0)
    with pytest.warns(UserWarning, match=r"peak memory about [\d.]+ GiB of [\d.]+ GiB free"):
        extract_isosurface(sphere, 24, 0.0)


def test_memory_estimate_of_a_2048_grid():
    cpu = torch.device("cpu")
    dense = mesh_cost.Estimate(2048, "dense", 1, 2047, 4, cpu).memory_bytes
    blocks = mesh_cost.Estimate(2048, "blocks", 16**3, 128, 4, cpu).memory_bytes
    assert dense > 2048**3 * 4  # at least its float32 level volume: 32 GiB
    assert blocks < 2**30  # one 129^3 block and the mesh


@pytest.mark.parametrize("name", SMOOTH_FIELDS)
def test_coarse_to_fine_queries_less_and_stays_within_half_a_voxel(name):
    resolution, field, chunk = 128, SMOOTH_FIELDS[name], 1 << 16  # cheap fields: big chunks
    dense = extract_isosurface(field, resolution, 0.0, method="dense", chunk_size=chunk)
    refined = extract_isosurface(field, resolution, 0.0, method="coarse_to_fine", chunk_size=chunk)
    assert refined.n_queries * 5 <= dense.n_queries
    assert hausdorff(refined.verts, dense.verts) <= 0.5 * voxel(resolution)
    assert len(refined.faces) == pytest.approx(len(dense.faces), rel=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("name", SMOOTH_FIELDS)
def test_coarse_to_fine_at_256_queries_8x_less(name):
    resolution, field = 256, SMOOTH_FIELDS[name]
    dense = extract_isosurface(field, resolution, 0.0, method="dense")
    refined = extract_isosurface(field, resolution, 0.0, method="coarse_to_fine")
    assert refined.n_queries * 8 <= dense.n_queries
    assert hausdorff(refined.verts, dense.verts) <= 0.5 * voxel(resolution)


PEAK_RSS_SCRIPT = """
import json, resource, sys, torch, trimesh
from tsr.mesh import extract_isosurface
torch.set_num_threads(2)
field = lambda p: 0.5 - (p - p.new_tensor([0.1, -0.05, 0.03])).norm(dim=-1)
result = extract_isosurface(field, int(sys.argv[1]), 0.0, method=sys.argv[2])
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB
closed = trimesh.Trimesh(result.verts, result.faces, process=False).is_watertight
print(json.dumps({"peak_mb": peak_mb, "blocks": result.n_blocks, "closed": closed}))
"""


@pytest.mark.slow
@pytest.mark.parametrize(("resolution", "method"), [(512, "auto"), (1024, "coarse_to_fine")])
def test_high_resolution_in_bounded_memory(resolution, method):
    run = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_SCRIPT, str(resolution), method],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["blocks"] > 1 and result["closed"]
    assert result["peak_mb"] <= 2048, result


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_queries_give_the_cpu_mesh():
    cpu = extract_isosurface(blobs, 48, 0.0, backend="pymcubes")
    cuda = extract_isosurface(blobs, 48, 0.0, backend="pymcubes", device="cuda")
    assert hausdorff(cpu.verts, cuda.verts) <= 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_marching_cubes_runs_on_the_gpu():
    field, bound = SMALL_PART_FIELDS["lumpy"]
    level = field(
        torch.stack(torch.meshgrid(*[grid_axis(64, RADIUS)] * 3, indexing="ij"), -1).reshape(-1, 3)
    )
    level = level.reshape(64, 64, 64)
    verts, faces = mc._marching_cubes_torch(level.cuda())
    assert verts.is_cuda and faces.is_cuda
    cpu_verts, cpu_faces = mc._marching_cubes_torch(level)
    assert torch.equal(faces.cpu(), cpu_faces)
    assert (verts.cpu() - cpu_verts).abs().max() <= 1e-6
    certified = extract_isosurface(field, 64, 0.0, lipschitz=bound, device="cuda")
    dense = extract_isosurface(field, 64, 0.0, method="dense", device="cuda")
    same_surface(certified, dense)
