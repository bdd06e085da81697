"""Procedural shape families: a seeded, embedded domain to fine-tune TripoSR on.

`make_shape(family, index, seed)` -> a watertight, coloured mesh in [-0.5, 0.5]^3 (bounding box
centred, longest side 1); `utils.data.prepare_object` frames it as TripoSR's view 0 needs.

- `primitives`: sphere (ellipsoid), box, cylinder, cone, capsule, torus; random proportions,
  pose and a two-colour gradient (so views of a symmetric solid still tell their sides apart).
- `parts`: CAD-like parts in the spirit of the ABC dataset, built with real boolean operations
  in manifold3d: plate with holes, L-bracket, flange with a bolt circle, stepped shaft with a
  keyway, hex nut, spur gear. Every solid that goes into a part carries its own colour; the
  walls a cutter leaves (holes, slots) get a darker shade of the body they were cut from.

The kind cycles with `index` (index % 6) so every family is balanced; the rest is drawn from a
generator seeded by (seed, family, index): the same arguments give the same mesh.
"""

from __future__ import annotations

import colorsys
import math
import zlib
from collections.abc import Callable

import manifold3d as mf
import numpy as np
import trimesh
from scipy.spatial.transform import Rotation

PRIMITIVE_KINDS = ("sphere", "box", "cylinder", "cone", "capsule", "torus")
PART_KINDS = ("plate", "l_bracket", "flange", "stepped_shaft", "hex_nut", "gear")
FAMILIES = {"primitives": PRIMITIVE_KINDS, "parts": PART_KINDS}

# View 0 looks along -x. A pose whose x extent exceeds this multiple of its larger y/z extent
# would, once scaled to fill 85 % of view 0, poke out of TripoSR's [-0.87, 0.87]^3 cube.
MAX_DEPTH_TO_WIDTH = 1.4
SEGMENTS = 64  # circle resolution: smooth at 256 px, a few thousand triangles per shape


def shape_kind(family: str, index: int) -> str:
    if family not in FAMILIES:
        raise ValueError(f"unknown shape family {family!r}; choose from {sorted(FAMILIES)}")
    return FAMILIES[family][index % len(FAMILIES[family])]


def make_shape(family: str, index: int, seed: int) -> trimesh.Trimesh:
    """Shape `index` of `family` -> watertight Trimesh, centred, longest bbox side 1."""
    kind = shape_kind(family, index)
    rng = np.random.default_rng([seed, zlib.crc32(family.encode()), index])
    mesh = PRIMITIVE_BUILDERS[kind](rng) if family == "primitives" else _build_part(kind, rng)
    mesh.apply_transform(_random_pose(mesh, rng))
    mesh = normalise_to_unit_box(mesh)
    mesh.metadata.update(family=family, kind=kind, index=index, seed=seed)
    if not mesh.is_watertight:
        raise RuntimeError(f"{family}/{kind} index {index} seed {seed} is not watertight")
    return mesh


def normalise_to_unit_box(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """Centre the bounding box on the origin and scale its longest side to 1 (in place)."""
    low, high = mesh.bounds
    mesh.apply_translation(-(low + high) / 2)
    mesh.apply_scale(1.0 / float((high - low).max()))
    return mesh


def _random_pose(mesh: trimesh.Trimesh, rng: np.random.Generator) -> np.ndarray:
    """A random rotation that keeps the shape's depth in view 0 moderate (see above)."""
    for _ in range(64):
        rotation = Rotation.random(random_state=rng).as_matrix()
        extent = np.ptp(mesh.vertices @ rotation.T, axis=0)  # (3,)
        if extent[0] <= MAX_DEPTH_TO_WIDTH * extent[1:].max():
            break
    else:  # 64 rejections in a row cannot happen for the proportions drawn here
        raise RuntimeError("no pose found that fits TripoSR's cube; proportions too extreme")
    pose = np.eye(4)
    pose[:3, :3] = rotation
    return pose


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """A saturated, mid-bright colour -> (3,) float in [0, 1]."""
    return np.array(
        colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.35, 0.9), rng.uniform(0.5, 0.95))
    )


def _to_rgba8(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) float in [0, 1] -> (..., 4) uint8, opaque."""
    rgb8 = np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8)
    return np.concatenate([rgb8, np.full((*rgb8.shape[:-1], 1), 255, np.uint8)], axis=-1)


# ---- primitives ----------------------------------------------------------------------------


def _gradient_colours(mesh: trimesh.Trimesh, rng: np.random.Generator) -> trimesh.Trimesh:
    """Blend two random colours along a random direction, as vertex colours."""
    first, second = _random_colour(rng), _random_colour(rng)
    direction = rng.normal(size=3)
    along = mesh.vertices @ (direction / np.linalg.norm(direction))  # (N,)
    t = ((along - along.min()) / max(np.ptp(along), 1e-9))[:, None]
    mesh.visual.vertex_colors = _to_rgba8((1 - t) * first + t * second)
    return mesh


def _sphere(rng: np.random.Generator) -> trimesh.Trimesh:
    mesh = trimesh.creation.icosphere(subdivisions=4, radius=0.5)
    mesh.apply_scale(rng.uniform(0.5, 1.0, size=3))  # an ellipsoid: "random proportions"
    return _gradient_colours(mesh, rng)


def _box(rng: np.random.Generator) -> trimesh.Trimesh:
    return _gradient_colours(trimesh.creation.box(extents=rng.uniform(0.3, 1.0, size=3)), rng)


def _cylinder(rng: np.random.Generator) -> trimesh.Trimesh:
    mesh = trimesh.creation.cylinder(
        radius=rng.uniform(0.2, 0.5), height=rng.uniform(0.4, 1.0), sections=SEGMENTS
    )
    return _gradient_colours(mesh, rng)


def _cone(rng: np.random.Generator) -> trimesh.Trimesh:
    mesh = trimesh.creation.cone(
        radius=rng.uniform(0.25, 0.5), height=rng.uniform(0.5, 1.0), sections=SEGMENTS
    )
    return _gradient_colours(mesh, rng)


def _capsule(rng: np.random.Generator) -> trimesh.Trimesh:
    mesh = trimesh.creation.capsule(
        height=rng.uniform(0.3, 0.8), radius=rng.uniform(0.15, 0.35), count=[32, 32]
    )
    return _gradient_colours(mesh, rng)


def _torus(rng: np.random.Generator) -> trimesh.Trimesh:
    major = rng.uniform(0.3, 0.45)
    mesh = trimesh.creation.torus(
        major_radius=major,
        minor_radius=major * rng.uniform(0.2, 0.5),
        major_sections=SEGMENTS,
        minor_sections=32,
    )
    return _gradient_colours(mesh, rng)


PRIMITIVE_BUILDERS: dict[str, Callable[[np.random.Generator], trimesh.Trimesh]] = {
    "sphere": _sphere,
    "box": _box,
    "cylinder": _cylinder,
    "cone": _cone,
    "capsule": _capsule,
    "torus": _torus,
}


# ---- CAD-like parts ------------------------------------------------------------------------
class _Palette:
    """Gives every solid a unique manifold id and remembers its colour, so the faces of the
    boolean result can be coloured by the solid they came from."""

    def __init__(self) -> None:
        self.colour_of_id: dict[int, np.ndarray] = {}

    def body(self, solid: mf.Manifold, colour: np.ndarray) -> mf.Manifold:
        solid = solid.as_original()
        self.colour_of_id[solid.original_id()] = colour
        return solid

    def cutter(self, solid: mf.Manifold, body_colour: np.ndarray) -> mf.Manifold:
        return self.body(solid, 0.6 * body_colour)  # machined walls: darker than the body

    def to_trimesh(self, solid: mf.Manifold) -> trimesh.Trimesh:
        mesh = solid.to_mesh()
        faces = np.asarray(mesh.tri_verts, dtype=np.int64)  # (F, 3)
        face_colours = np.zeros((len(faces), 3))
        run_start = np.asarray(mesh.run_index) // 3  # run_index counts triangle corners
        for run, original_id in enumerate(mesh.run_original_id):
            face_colours[run_start[run] : run_start[run + 1]] = self.colour_of_id[original_id]
        result = trimesh.Trimesh(np.asarray(mesh.vert_properties)[:, :3], faces, process=False)
        result.visual.face_colors = _to_rgba8(face_colours)
        return result


def _cylinder_z(radius: float, height: float, centre=(0.0, 0.0, 0.0)) -> mf.Manifold:
    return mf.Manifold.cylinder(height, radius, radius, SEGMENTS, True).translate(centre)


def _plate(rng: np.random.Generator, palette: _Palette, colour: np.ndarray) -> mf.Manifold:
    width, depth, thickness = 1.0, rng.uniform(0.5, 0.9), rng.uniform(0.06, 0.14)
    plate = palette.body(mf.Manifold.cube((width, depth, thickness), True), colour)
    columns, rows = int(rng.integers(2, 4)), int(rng.integers(1, 3))
    radius = rng.uniform(0.04, 0.08)
    xs = np.linspace(-width / 2 + 0.15, width / 2 - 0.15, columns)
    ys = np.linspace(-depth / 2 + 0.15, depth / 2 - 0.15, rows) if rows > 1 else [0.0]
    holes = [_cylinder_z(radius, 2 * thickness, (x, y, 0)) for x in xs for y in ys]
    return plate - palette.cutter(mf.Manifold.batch_boolean(holes, mf.OpType.Add), colour)


def _l_bracket(rng: np.random.Generator, palette: _Palette, colour: np.ndarray) -> mf.Manifold:
    length, width, thickness = 1.0, rng.uniform(0.35, 0.7), rng.uniform(0.08, 0.14)
    height = rng.uniform(0.5, 0.9)
    base = mf.Manifold.cube((length, width, thickness), False)
    leg = mf.Manifold.cube((thickness, width, height), False)
    bracket = palette.body(base + leg, colour)
    radius = rng.uniform(0.04, 0.07)
    holes = [
        _cylinder_z(radius, 3 * thickness, (x, width / 2, thickness / 2))
        for x in np.linspace(0.35, length - 0.15, 2)
    ]
    holes += [
        _cylinder_z(radius, 3 * thickness)
        .rotate((0, 90, 0))
        .translate((thickness / 2, width / 2, z))
        for z in np.linspace(0.35, height - 0.15, 2)
    ]
    return bracket - palette.cutter(mf.Manifold.batch_boolean(holes, mf.OpType.Add), colour)


def _flange(rng: np.random.Generator, palette: _Palette, colour: np.ndarray) -> mf.Manifold:
    disc_thickness, hub_radius = rng.uniform(0.08, 0.16), rng.uniform(0.18, 0.28)
    hub_height = rng.uniform(0.2, 0.45)
    disc = palette.body(_cylinder_z(0.5, disc_thickness, (0, 0, disc_thickness / 2)), colour)
    hub_colour = _random_colour(rng)
    hub = palette.body(_cylinder_z(hub_radius, hub_height, (0, 0, hub_height / 2)), hub_colour)
    bore = palette.cutter(_cylinder_z(hub_radius * rng.uniform(0.4, 0.7), 2.0), hub_colour)
    n_bolts, bolt_circle = int(rng.integers(4, 9)), (0.5 + hub_radius) / 2
    bolts = [
        _cylinder_z(0.035, 1.0, (bolt_circle * math.cos(a), bolt_circle * math.sin(a), 0))
        for a in np.linspace(0, 2 * math.pi, n_bolts, endpoint=False)
    ]
    bolt_holes = palette.cutter(mf.Manifold.batch_boolean(bolts, mf.OpType.Add), colour)
    return (disc + hub) - bore - bolt_holes


def _stepped_shaft(rng: np.random.Generator, palette: _Palette, colour: np.ndarray) -> mf.Manifold:
    n_steps = int(rng.integers(3, 5))
    radii = np.sort(rng.uniform(0.08, 0.22, n_steps))[::-1]
    lengths = rng.uniform(0.15, 0.4, n_steps)
    starts = np.concatenate([[0.0], np.cumsum(lengths)[:-1]])
    steps = [
        palette.body(_cylinder_z(r, h, (0, 0, z + h / 2)), colour if i % 2 == 0 else 0.8 * colour)
        for i, (r, h, z) in enumerate(zip(radii, lengths, starts, strict=True))
    ]
    shaft = mf.Manifold.batch_boolean(steps, mf.OpType.Add)
    # a keyway: a slot milled into the side of the thickest step
    key_width = radii[0] * 0.5
    key = mf.Manifold.cube((key_width, key_width, lengths[0] * 0.7), True).translate(
        (radii[0], 0, lengths[0] / 2)
    )
    return shaft - palette.cutter(key, colour)


def _hex_nut(rng: np.random.Generator, palette: _Palette, colour: np.ndarray) -> mf.Manifold:
    height = rng.uniform(0.3, 0.6)
    prism = mf.CrossSection.circle(0.5, 6).extrude(height).translate((0, 0, -height / 2))
    # the chamfer of a real nut: intersect with a double cone
    chamfer = mf.Manifold.cylinder(height, 0.5, 0.5 + height / 2, SEGMENTS, True)
    chamfer = chamfer ^ mf.Manifold.cylinder(height, 0.5 + height / 2, 0.5, SEGMENTS, True)
    nut = palette.body(prism ^ chamfer, colour)
    return nut - palette.cutter(_cylinder_z(rng.uniform(0.18, 0.28), 2 * height), colour)


def _gear(rng: np.random.Generator, palette: _Palette, colour: np.ndarray) -> mf.Manifold:
    n_teeth, thickness = int(rng.integers(10, 25)), rng.uniform(0.12, 0.3)
    root, tip = 0.5 - rng.uniform(0.06, 0.1), 0.5
    outline = []  # trapezoidal teeth: two points at the root, two at the tip, per tooth
    for k in range(n_teeth):
        a = 2 * math.pi * k / n_teeth
        pitch = 2 * math.pi / n_teeth
        for radius, fraction in ((root, 0.0), (tip, 0.2), (tip, 0.45), (root, 0.65)):
            angle = a + fraction * pitch
            outline.append((radius * math.cos(angle), radius * math.sin(angle)))
    gear = mf.CrossSection([outline]).extrude(thickness).translate((0, 0, -thickness / 2))
    gear = palette.body(gear, colour)
    hub_colour = _random_colour(rng)
    hub_height = thickness * rng.uniform(1.5, 2.5)
    hub = palette.body(_cylinder_z(rng.uniform(0.15, 0.25), hub_height), hub_colour)
    bore = palette.cutter(_cylinder_z(rng.uniform(0.06, 0.12), 2.0), hub_colour)
    return (gear + hub) - bore


PART_BUILDERS: dict[str, Callable[[np.random.Generator, _Palette, np.ndarray], mf.Manifold]] = {
    "plate": _plate,
    "l_bracket": _l_bracket,
    "flange": _flange,
    "stepped_shaft": _stepped_shaft,
    "hex_nut": _hex_nut,
    "gear": _gear,
}


def _build_part(kind: str, rng: np.random.Generator) -> trimesh.Trimesh:
    palette = _Palette()
    solid = PART_BUILDERS[kind](rng, palette, _random_colour(rng))
    if solid.status() != mf.Error.NoError or solid.is_empty():
        raise RuntimeError(f"manifold3d failed to build a {kind}: {solid.status()}")
    return palette.to_trimesh(solid)
