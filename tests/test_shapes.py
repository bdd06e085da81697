"""Procedural shapes: watertight, centred, normalised, coloured, deterministic."""

import numpy as np
import pytest

from utils.data.shapes import FAMILIES, MAX_DEPTH_TO_WIDTH, make_shape

ALL_SHAPES = [(family, index) for family, kinds in FAMILIES.items() for index in range(len(kinds))]


@pytest.mark.parametrize(("family", "index"), ALL_SHAPES)
def test_every_kind_is_a_closed_normalised_coloured_solid(family, index):
    mesh = make_shape(family, index, seed=3)
    assert mesh.metadata["kind"] == FAMILIES[family][index]
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.volume > 0  # outward normals
    low, high = mesh.bounds
    np.testing.assert_allclose((low + high) / 2, 0, atol=1e-9)  # centred
    assert np.ptp(mesh.bounds, axis=0).max() == pytest.approx(1.0)  # longest side 1
    assert np.abs(mesh.vertices).max() <= 0.5 + 1e-9  # inside the unit cube
    # posed so view 0 (looking along -x) can frame it without leaving TripoSR's cube
    extent = np.ptp(mesh.vertices, axis=0)
    assert extent[0] <= MAX_DEPTH_TO_WIDTH * extent[1:].max() + 1e-9
    assert mesh.visual.kind in ("vertex", "face")


@pytest.mark.parametrize("kind", ["plate", "flange", "hex_nut", "gear"])
def test_parts_have_real_holes_and_several_colours(kind):
    mesh = make_shape("parts", FAMILIES["parts"].index(kind), seed=0)
    assert mesh.body_count == 1
    genus = (2 - mesh.euler_number) // 2  # through-holes made by the boolean difference
    assert genus >= 1
    colours = np.unique(mesh.visual.face_colors, axis=0)
    assert len(colours) >= 2  # body + the darker walls the cutters left


def test_same_seed_same_mesh_other_seed_other_mesh():
    for family in FAMILIES:
        first, again = make_shape(family, 4, seed=11), make_shape(family, 4, seed=11)
        assert np.array_equal(first.vertices, again.vertices)
        assert np.array_equal(first.faces, again.faces)
        assert np.array_equal(first.visual.vertex_colors, again.visual.vertex_colors)
        other = make_shape(family, 4, seed=12)
        assert not np.array_equal(np.sort(first.vertices, axis=0), np.sort(other.vertices, axis=0))


def test_unknown_family_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown shape family"):
        make_shape("chairs", 0, seed=0)
