"""Textured and multi-material meshes in, faithful dataset views out; sides of open meshes.

Every mesh file here is written by the test: a UV-mapped cube with a checkerboard PNG (as GLB
and as OBJ + MTL), a glTF mesh with a textured and an untextured primitive, open and
inverted boxes. Views are checked against a reference renderer written here from the
documented camera convention, with its own ray-triangle test and texture lookup.
"""

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from tsr.cameras import orbit_cameras
from utils.data.build import prepare_dataset
from utils.data.dataset import MultiViewDataset, read_object
from utils.data.materials import UNCOLOURED, UNTEXTURED_COLOUR, sample_texture
from utils.data.meshes import load_mesh, read_mesh
from utils.data.occupancy_labels import odd_ray_share
from utils.data.prepare_object import occupancy_samples, prepare_object
from utils.data.render_views import AMBIENT, LIGHTS, render_views

REPO = Path(__file__).resolve().parents[1]
SIZE = 128
RED, YELLOW = (200, 30, 40), (250, 230, 60)  # the checkerboard's squares, sRGB
PAINT = (0.05, 0.2, 0.9)  # linear base colour factor of the untextured primitive


# ---- test files ----------------------------------------------------------------------------


def checkerboard(squares: int = 8, pixels: int = 16) -> np.ndarray:
    """(H, W, 3) uint8: squares x squares, the top-left one red."""
    cells = np.arange(squares * pixels) // pixels
    odd = (cells[:, None] + cells[None, :]) % 2 == 1
    return np.where(odd[..., None], YELLOW, RED).astype(np.uint8)


def uv_cube() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit cube, y up, each face mapped to the whole texture (v up, OBJ's convention).
    -> vertices (24, 3), faces (12, 3) outward, uv (24, 2)"""
    square = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    vertices, faces = [], []
    for axis in range(3):
        for sign in (-1.0, 1.0):
            u_axis, v_axis = [a for a in range(3) if a != axis]
            quad = np.zeros((4, 3))
            quad[:, axis] = 0.5 * sign
            quad[:, u_axis], quad[:, v_axis] = square[:, 0] - 0.5, square[:, 1] - 0.5
            face = np.array([[0, 1, 2], [0, 2, 3]])
            if np.cross(quad[1] - quad[0], quad[2] - quad[0])[axis] * sign < 0:
                face = face[:, ::-1]
            faces.append(face + 4 * len(vertices))
            vertices.append(quad)
    return np.concatenate(vertices), np.concatenate(faces), np.tile(square, (6, 1))


def write_glb(
    path: Path,
    primitives: list[dict],
    materials: list[dict],
    png: bytes | None,
    wrap: tuple[int, int] = (10497, 10497),
    matrix: list | None = None,
) -> None:
    """A minimal glTF 2.0 binary: one node, one mesh of `primitives` (dicts with positions,
    indices, optional uv in v-up convention and material index), one optional PNG texture."""
    blob, views, accessors = bytearray(), [], []

    def add_view(data: bytes) -> int:
        blob.extend(b"\0" * (-len(blob) % 4))
        views.append({"buffer": 0, "byteOffset": len(blob), "byteLength": len(data)})
        blob.extend(data)
        return len(views) - 1

    def add_accessor(array: np.ndarray, kind: str, component: int) -> int:
        accessor = {
            "bufferView": add_view(array.tobytes()),
            "componentType": component,
            "count": len(array),
            "type": kind,
        }
        if kind == "VEC3":
            accessor |= {"min": array.min(0).tolist(), "max": array.max(0).tolist()}
        accessors.append(accessor)
        return len(accessors) - 1

    gltf_primitives = []
    for p in primitives:
        attributes = {"POSITION": add_accessor(p["positions"].astype(np.float32), "VEC3", 5126)}
        if "uv" in p:  # glTF's v runs down the image
            uv = np.stack([p["uv"][:, 0], 1.0 - p["uv"][:, 1]], axis=-1).astype(np.float32)
            attributes["TEXCOORD_0"] = add_accessor(uv, "VEC2", 5126)
        primitive = {
            "attributes": attributes,
            "indices": add_accessor(p["indices"].astype(np.uint32).ravel(), "SCALAR", 5125),
        }
        if "material" in p:
            primitive["material"] = p["material"]
        gltf_primitives.append(primitive)
    header = {
        "asset": {"version": "2.0"},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0} | ({"matrix": matrix} if matrix else {})],
        "meshes": [{"primitives": gltf_primitives}],
        "materials": materials,
    }
    if png is not None:
        header["images"] = [{"bufferView": add_view(png), "mimeType": "image/png"}]
        header["samplers"] = [{"wrapS": wrap[0], "wrapT": wrap[1]}]
        header["textures"] = [{"source": 0, "sampler": 0}]
    blob.extend(b"\0" * (-len(blob) % 4))
    header |= {"buffers": [{"byteLength": len(blob)}], "bufferViews": views, "accessors": accessors}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 4)
    chunks = struct.pack("<I4s", len(text), b"JSON") + text
    chunks += struct.pack("<I4s", len(blob), b"BIN\0") + bytes(blob)
    path.write_bytes(struct.pack("<4sII", b"glTF", 2, 12 + len(chunks)) + chunks)


def png_bytes(image: np.ndarray, path: Path) -> bytes:
    Image.fromarray(image).save(path)
    return path.read_bytes()


CHECKER_MATERIAL = {"name": "checker", "pbrMetallicRoughness": {"baseColorTexture": {"index": 0}}}


def write_checker_cube_glb(path: Path) -> None:
    vertices, faces, uv = uv_cube()
    png = png_bytes(checkerboard(), path.with_name("checker_for_glb.png"))
    primitive = {"positions": vertices, "indices": faces, "uv": uv, "material": 0}
    write_glb(path, [primitive], [CHECKER_MATERIAL], png)


def write_checker_cube_obj(path: Path) -> None:
    """The same cube as OBJ + MTL + PNG, written in z-up coordinates (y-up (x, y, z) is z-up
    (z, x, y)), so that it is read with the default --input-up z."""
    vertices, faces, uv = uv_cube()
    Image.fromarray(checkerboard()).save(path.with_name("checker.png"))
    path.with_suffix(".mtl").write_text("newmtl checker\nKd 0.8 0.8 0.8\nmap_Kd checker.png\n")
    lines = [f"mtllib {path.with_suffix('.mtl').name}", "usemtl checker"]
    lines += [f"v {x} {y} {z}" for x, y, z in vertices[:, [2, 0, 1]]]
    lines += [f"vt {u} {v}" for u, v in uv]
    lines += [f"f {a}/{a} {b}/{b} {c}/{c}" for a, b, c in faces + 1]
    path.write_text("\n".join(lines) + "\n")


# ---- an independent reference renderer -----------------------------------------------------


def srgb_decode(c):
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def srgb_encode(c):
    c = np.clip(c, 0, 1)
    return np.where(c <= 0.0031308, 12.92 * c, 1.055 * c ** (1 / 2.4) - 0.055)


def reference_view(vertices, faces, uv, texture, c2w, fovy_deg, size, grid=4):
    """Every pixel from grid x grid rays; first hit by Moeller-Trumbore over all triangles;
    texture by bilinear lookup of decoded texels (repeat); flat Lambert + ambient under the
    renderer's lights on the side facing the ray. -> straight RGB (H, W, 3), coverage (H, W)"""
    f = 0.5 * size / np.tan(np.radians(fovy_deg) / 2)
    offsets = (np.arange(grid) + 0.5) / grid
    j, i = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    x = (i[..., None, None] + offsets[None, :] - size / 2) / f  # (H, W, 1, g)
    y = -(j[..., None, None] + offsets[:, None] - size / 2) / f  # (H, W, g, 1)
    x, y = np.broadcast_arrays(x, y)
    camera = np.stack([x, y, -np.ones_like(x)], axis=-1).reshape(-1, 3)
    directions = camera @ c2w[:3, :3].T
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    origin = c2w[:3, 3]

    a, b, c = (vertices[faces[:, k]] for k in range(3))  # (F, 3) each
    e1, e2 = b - a, c - a
    p = np.cross(directions[:, None], e2[None])  # (R, F, 3)
    det = np.einsum("rfc,fc->rf", p, e1)
    safe = np.where(np.abs(det) < 1e-12, 1e-12, det)
    s = origin - a  # (F, 3)
    u = np.einsum("rfc,fc->rf", p, s) / safe
    q = np.cross(s, e1)  # (F, 3)
    v = np.einsum("rc,fc->rf", directions, q) / safe
    t = np.einsum("fc,fc->f", e2, q)[None] / safe
    valid = (np.abs(det) > 1e-12) & (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 0)
    t = np.where(valid, t, np.inf)
    face = t.argmin(axis=1)
    rays = np.arange(len(directions))
    hit = np.isfinite(t[rays, face])
    bu, bv = u[rays, face], v[rays, face]

    corner_uv = uv[faces[face]]  # (R, 3, 2)
    texcoord = (1 - bu - bv)[:, None] * corner_uv[:, 0] + bu[:, None] * corner_uv[:, 1]
    texcoord += bv[:, None] * corner_uv[:, 2]
    h, w = texture.shape[:2]
    col, row = texcoord[:, 0] * w - 0.5, (1 - texcoord[:, 1]) * h - 0.5
    c0, r0 = np.floor(col).astype(int), np.floor(row).astype(int)
    fc, fr = (col - c0)[:, None], (row - r0)[:, None]
    linear = srgb_decode(texture / 255.0)
    texel = lambda rr, cc: linear[rr % h, cc % w]  # noqa: E731
    colour = (texel(r0, c0) * (1 - fc) + texel(r0, c0 + 1) * fc) * (1 - fr)
    colour += (texel(r0 + 1, c0) * (1 - fc) + texel(r0 + 1, c0 + 1) * fc) * fr

    normal = np.cross(e1, e2)[face]
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    normal *= -np.sign(np.einsum("rc,rc->r", normal, directions))[:, None]
    light = np.full(len(rays), AMBIENT)
    for towards, intensity in LIGHTS:
        light += intensity * np.clip(
            normal @ (np.asarray(towards) / np.linalg.norm(towards)), 0, None
        )
    shaded = np.clip(srgb_encode(colour) * light[:, None], 0, 1) * hit[:, None]
    shaded = shaded.reshape(size, size, grid * grid, 3)
    coverage = hit.reshape(size, size, grid * grid).mean(axis=-1)
    rgb = shaded.sum(axis=2) / np.maximum(hit.reshape(size, size, -1).sum(axis=2), 1)[..., None]
    return rgb, coverage


def psnr_on_grey(rgba: np.ndarray, rgb: np.ndarray, coverage: np.ndarray) -> float:
    """PSNR (dB) of two renders composited on TripoSR's 0.5 grey: colour and coverage count."""
    ours = rgba[..., :3] / 255.0 * (rgba[..., 3:] / 255.0) + 0.5 * (1 - rgba[..., 3:] / 255.0)
    theirs = rgb * coverage[..., None] + 0.5 * (1 - coverage[..., None])
    return float(10 * np.log10(1.0 / np.mean((ours - theirs) ** 2)))


def world_vertices(meta: dict) -> np.ndarray:
    """The test cube as prepare_object placed it: y-up -> z-up, centred, unit size, framed."""
    vertices = uv_cube()[0][:, [2, 0, 1]]
    low, high = vertices.min(0), vertices.max(0)
    vertices = (vertices - (low + high) / 2) / (high - low).max()
    return vertices * meta["scale"] + np.asarray(meta["offset"])


# ---- faithful views ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checker_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("textured")
    write_checker_cube_glb(folder / "cube_glb.glb")
    write_checker_cube_obj(folder / "cube_obj.obj")
    out = folder / "set"
    prepare_dataset(out, n_views=3, size=SIZE, seed=0, input_folder=folder, workers=1)
    return out


@pytest.mark.parametrize("object_id", ["cube_glb", "cube_obj"])
def test_checkerboard_views_match_an_independent_per_pixel_render(checker_set, object_id):
    views = read_object(checker_set / object_id)
    vertices, faces, uv = world_vertices(views["meta"]), *uv_cube()[1:]
    for v in range(len(views["rgba"])):
        rgb, coverage = reference_view(
            vertices, faces, uv, checkerboard(), views["c2w"][v], views["fovy_deg"], SIZE
        )
        assert psnr_on_grey(views["rgba"][v], rgb, coverage) >= 30.0, (object_id, v)


def test_per_vertex_colours_would_fail_the_same_comparison(checker_set):
    """The oracle is sensitive: trimesh's to_color() (one colour per vertex) loses the squares."""
    views = read_object(checker_set / "cube_glb")
    vertices, faces, uv = world_vertices(views["meta"]), *uv_cube()[1:]
    texture = trimesh.visual.material.SimpleMaterial(image=Image.fromarray(checkerboard()))
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    mesh.visual = trimesh.visual.TextureVisuals(uv=uv, material=texture).to_color()
    rgba = render_views(mesh, views["c2w"][1:2], views["fovy_deg"], SIZE)["rgba"][0]
    rgb, coverage = reference_view(
        vertices, faces, uv, checkerboard(), views["c2w"][1], views["fovy_deg"], SIZE
    )
    assert psnr_on_grey(rgba, rgb, coverage) < 20.0


def test_glb_and_obj_of_one_cube_render_alike(tmp_path):
    write_checker_cube_glb(tmp_path / "cube.glb")
    write_checker_cube_obj(tmp_path / "cube.obj")
    c2w = orbit_cameras(3, elevation_deg=25.0, camera_distance=1.9)
    glb, obj = (
        render_views(mesh, c2w, 40.0, 64, appearance=appearance)
        for mesh, appearance in (
            read_mesh(tmp_path / "cube.glb", "y"),
            read_mesh(tmp_path / "cube.obj"),
        )
    )
    np.testing.assert_array_equal(glb["depth"] > 0, obj["depth"] > 0)
    difference = np.abs(glb["rgba"].astype(int) - obj["rgba"].astype(int))
    assert np.percentile(difference, 99) <= 2  # different vertex orders round differently


def test_bilinear_lookup_in_linear_light_with_wrap_modes():
    texture = np.array([[[0, 0, 0], [255, 255, 255]], [[255, 0, 0], [0, 0, 255]]], np.uint8)
    # texel centres: column i at u = (i + 0.5) / 2, row j at v = 1 - (j + 0.5) / 2
    centres = np.array([[0.25, 0.75], [0.75, 0.75], [0.25, 0.25], [0.75, 0.25]])
    np.testing.assert_allclose(
        sample_texture(texture, centres, ("clamp", "clamp")),
        [[0, 0, 0], [1, 1, 1], [1, 0, 0], [0, 0, 1]],
        atol=1e-12,
    )
    # texels are decoded from sRGB: 128 is 0.2159 of the light, by the sRGB formula
    grey = sample_texture(
        np.full((1, 1, 3), 128, np.uint8), np.array([[0.3, 0.6]]), ("repeat",) * 2
    )
    np.testing.assert_allclose(grey, ((128 / 255 + 0.055) / 1.055) ** 2.4, atol=1e-12)
    # halfway between black and white: half the light, which sRGB shows as 0.735, not 0.5
    half = sample_texture(texture, np.array([[0.5, 0.75]]), ("clamp", "clamp"))
    np.testing.assert_allclose(half, 0.5, atol=1e-12)
    u = np.array([[1.25 + 0.5 / 2, 0.75]])  # a quarter texture past the right edge
    np.testing.assert_allclose(sample_texture(texture, u, ("repeat", "repeat")), 0.5)
    np.testing.assert_allclose(sample_texture(texture, u, ("clamp", "clamp")), 1.0)
    # mirrored: u = 1.4 reads u = 0.6, 0.7 of the way from the black to the white texel
    mirrored = sample_texture(texture, np.array([[1.4, 0.75], [0.6, 0.75]]), ("mirror",) * 2)
    np.testing.assert_allclose(mirrored, 0.7, atol=1e-12)


def test_a_texel_under_full_light_keeps_its_srgb_value(tmp_path):
    flat = np.full((4, 4, 3), 77, np.uint8)
    vertices, faces, uv = uv_cube()
    write_glb(
        tmp_path / "flat.glb",
        [{"positions": vertices, "indices": faces, "uv": uv, "material": 0}],
        [CHECKER_MATERIAL],
        png_bytes(flat, tmp_path / "f.png"),
    )
    _, appearance = read_mesh(tmp_path / "flat.glb")
    base = appearance.base_colours(np.arange(12), np.full((12, 3), 1 / 3), UNTEXTURED_COLOUR)
    np.testing.assert_allclose(base, 77 / 255, atol=1e-12)


def hue_share(rgba: np.ndarray, srgb: np.ndarray) -> float:
    """Share of fully covered pixels whose hue (colour / its largest channel) is `srgb`'s."""
    pixels = rgba[rgba[..., 3] == 255][:, :3].astype(float)
    hue = pixels / np.maximum(pixels.max(axis=1, keepdims=True), 1)
    return float(np.mean(np.linalg.norm(hue - srgb / srgb.max(), axis=1) < 0.12))


@pytest.mark.parametrize("second", ["without material", "painted"])
def test_two_primitives_keep_their_own_materials(tmp_path, second):
    vertices, faces, uv = uv_cube()
    box = trimesh.creation.box(extents=(0.6, 0.6, 0.6))
    png = png_bytes(checkerboard(), tmp_path / "c.png")
    paint = {"name": "paint", "pbrMetallicRoughness": {"baseColorFactor": [*PAINT, 1.0]}}
    primitives = [
        {"positions": vertices * 0.8 + [0.5, 0, 0], "indices": faces, "uv": uv, "material": 0},
        {"positions": box.vertices - [0.5, 0, 0], "indices": box.faces}
        | ({"material": 1} if second == "painted" else {}),
    ]
    write_glb(tmp_path / "two.glb", primitives, [CHECKER_MATERIAL, paint], png, (33071, 33071))
    if second == "without material":  # joining the primitives' visuals first loses every colour
        assert trimesh.load(tmp_path / "two.glb", force="mesh").visual.kind is None

    mesh, appearance = read_mesh(tmp_path / "two.glb")
    assert len(mesh.faces) == 24 and appearance.materials[0].wrap == ("clamp", "clamp")
    expected = [0] * 12 + ([1] * 12 if second == "painted" else [UNCOLOURED] * 12)
    np.testing.assert_array_equal(appearance.face_material, expected)
    prepare_object(mesh, tmp_path / "two", n_views=4, size=64, appearance=appearance)
    rgba = read_object(tmp_path / "two")["rgba"]
    second_colour = srgb_encode(np.array(PAINT)) if second == "painted" else UNTEXTURED_COLOUR
    shares = {
        "red squares": hue_share(rgba, np.divide(RED, 255)),
        "yellow squares": hue_share(rgba, np.divide(YELLOW, 255)),
        second: hue_share(rgba, np.asarray(second_colour)),
    }
    assert all(share > 0.08 for share in shares.values()), shares


def test_gltf_inputs_are_y_up_whatever_the_flag_other_formats_follow_it(tmp_path):
    tall = trimesh.creation.box(extents=(0.2, 1.0, 0.3))  # tall along y
    meshes = tmp_path / "meshes"
    meshes.mkdir()
    write_glb(meshes / "tall.glb", [{"positions": tall.vertices, "indices": tall.faces}], [], None)
    tall.export(meshes / "tall.stl")
    for flag, stl_extents in (("z", (0.2, 1.0, 0.3)), ("y", (0.3, 0.2, 1.0))):
        out = tmp_path / f"set_{flag}"
        prepare_dataset(out, input_folder=meshes, input_up=flag, n_views=2, size=32, workers=1)
        extents = {
            name: np.ptp(json.loads((out / name / "meta.json").read_text())["bounds"], axis=0)
            for name in ("tall", "tall_stl")
        }
        np.testing.assert_allclose(extents["tall"] / extents["tall"].max(), (0.3, 0.2, 1.0))
        np.testing.assert_allclose(extents["tall_stl"] / extents["tall_stl"].max(), stl_extents)
    # our own mesh.glb files hold z-up coordinates: evaluation reads them as stored
    stored = trimesh.load(out / "tall" / "mesh.glb", force="mesh").vertices
    np.testing.assert_allclose(load_mesh(out / "tall" / "mesh.glb").vertices, stored)


def test_a_mirroring_node_keeps_faces_outward(tmp_path):
    box = trimesh.creation.box()
    mirror = [-1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]  # column-major 4x4
    write_glb(
        tmp_path / "m.glb",
        [{"positions": box.vertices, "indices": box.faces}],
        [],
        None,
        matrix=mirror,
    )
    mesh, _ = read_mesh(tmp_path / "m.glb")
    assert mesh.is_watertight and mesh.volume > 0


def test_default_untextured_colour_stands_out_from_grey_at_every_shade():
    lights = np.linspace(AMBIENT, AMBIENT + sum(i for _, i in LIGHTS), 200)

    def closest_to_background(colour):  # largest channel difference from 0.5, worst shade
        shaded = np.clip(np.outer(lights, colour), 0, 1)
        return np.abs(shaded - 0.5).max(axis=1).min()

    assert closest_to_background(np.full(3, 0.7)) < 0.01  # the old grey vanishes at one shade
    assert closest_to_background(np.asarray(UNTEXTURED_COLOUR)) > 0.15


def test_untextured_flag_colour_palette_and_bad_values(tmp_path):
    meshes = tmp_path / "cad"
    meshes.mkdir()
    for k in range(3):
        trimesh.creation.box(extents=(0.5, 0.3 + 0.1 * k, 0.4)).export(meshes / f"part{k}.stl")
    args = ["--input-folder", str(meshes), "--views", "2", "--size", "32", "--workers", "1"]

    def run(*extra):
        return subprocess.run(
            [sys.executable, str(REPO / "prepare_data.py"), *args, *extra],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )

    assert (
        run("--out", str(tmp_path / "blue"), "--untextured-colour", "0.1,0.2,0.8").returncode == 0
    )
    meta = json.loads((tmp_path / "blue" / "part0" / "meta.json").read_text())
    assert meta["untextured_colour"] == [0.1, 0.2, 0.8]
    glb = trimesh.load(tmp_path / "blue" / "part0" / "mesh.glb", force="mesh")
    np.testing.assert_array_equal(glb.visual.vertex_colors[:, :3], [[26, 51, 204]] * 8)

    assert run("--out", str(tmp_path / "palette"), "--untextured-colour", "palette").returncode == 0
    colours = [
        json.loads((tmp_path / "palette" / f"part{k}" / "meta.json").read_text())[
            "untextured_colour"
        ]
        for k in range(3)
    ]
    assert len({tuple(c) for c in colours}) == 3  # one per object
    assert all(max(c) - min(c) > 0.5 for c in colours)  # saturated: far from the grey axis
    prepare_dataset(
        tmp_path / "again", input_folder=meshes, n_views=2, size=32, workers=1, untextured="palette"
    )
    assert (
        json.loads((tmp_path / "again" / "part1" / "meta.json").read_text())["untextured_colour"]
        == colours[1]
    )

    for bad in ("red", "1.5,0,0", "0.1,0.2"):
        result = run("--out", str(tmp_path / "bad"), "--untextured-colour", bad)
        assert result.returncode == 2 and "--untextured-colour" in result.stderr, result.stderr


# ---- sides of open and inverted meshes -----------------------------------------------------


def open_box(inverted: bool = False) -> trimesh.Trimesh:
    """The unit cube without its top face; its true inside is the cube."""
    box = trimesh.creation.box()
    faces = box.faces[box.face_normals[:, 2] < 0.5]
    return trimesh.Trimesh(box.vertices, faces[:, ::-1] if inverted else faces)


def exact_winding_number(mesh: trimesh.Trimesh, points: np.ndarray) -> np.ndarray:
    """Sum of signed solid angles (van Oosterom & Strackee) / 4 pi, brute force."""
    d = mesh.triangles[None] - points[:, None, None]  # (N, F, 3, 3)
    length = np.linalg.norm(d, axis=-1)
    a, b, c = d[..., 0, :], d[..., 1, :], d[..., 2, :]
    la, lb, lc = length[..., 0], length[..., 1], length[..., 2]
    numerator = np.einsum("nfc,nfc->nf", a, np.cross(b, c))
    denominator = la * lb * lc + np.einsum("nfc,nfc->nf", a, b) * lc
    denominator += np.einsum("nfc,nfc->nf", b, c) * la + np.einsum("nfc,nfc->nf", c, a) * lb
    return np.arctan2(numerator, denominator).sum(axis=1) / (2 * np.pi)


def near_label_agreement(mesh, truth) -> tuple[float, dict]:
    samples, labels = occupancy_samples(mesh, 2000, np.random.default_rng(0))
    points = samples["points"][:1000].astype(np.float64)  # the near-surface half
    return float(np.mean(samples["inside"][:1000] == truth(points))), labels


def in_cube(points):
    return (np.abs(points) < 0.5).all(axis=1)


@pytest.mark.parametrize("inverted", [False, True])
def test_open_box_labels_follow_the_true_side(inverted):
    agreement, labels = near_label_agreement(open_box(inverted), in_cube)
    assert labels["method"] == "ray votes" and labels["ambiguous_share"] < 0.1
    assert agreement >= 0.97, agreement
    # contains() (one ray's parity) on the same points is far worse: the bug this replaces
    samples, _ = occupancy_samples(open_box(inverted), 2000, np.random.default_rng(0))
    points = samples["points"][:1000].astype(np.float64)
    assert np.mean(open_box(inverted).contains(points) == in_cube(points)) < agreement - 0.05


def test_inverted_closed_box_labels_are_exact():
    box = trimesh.creation.box()
    agreement, labels = near_label_agreement(
        trimesh.Trimesh(box.vertices, box.faces[:, ::-1]), in_cube
    )
    assert labels["method"] == "ray parity" and agreement == 1.0


def test_odd_ray_share_estimates_the_winding_number():
    mesh = open_box()
    points = np.random.default_rng(1).uniform(-0.7, 0.7, (400, 3))
    share = odd_ray_share(mesh, points, np.random.default_rng(2), n_rays=128)
    exact = np.abs(exact_winding_number(mesh, points))
    assert np.abs(share - exact).mean() < 0.04  # 128 rays: standard error <= 0.044
    assert np.mean((share > 0.5) == (exact > 0.5)) > 0.97


def test_sheet_gets_no_occupancy_points_and_the_summary_says_so(tmp_path):
    meshes = tmp_path / "meshes"
    meshes.mkdir()
    sheet = trimesh.Trimesh(
        [[0, 0, 0], [1, 0, 0.1], [1, 1, 0], [0, 1, 0.1]], [[0, 1, 2], [0, 2, 3]]
    )
    sheet.export(meshes / "sheet.stl")
    open_box().export(meshes / "open_box.stl")
    trimesh.creation.box().export(meshes / "closed_box.stl")
    out = tmp_path / "set"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "prepare_data.py"),
            "--out",
            str(out),
            "--input-folder",
            str(meshes),
            "--views",
            "2",
            "--size",
            "32",
            "--occupancy-points",
            "400",
            "--workers",
            "1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "1 ray parity, 1 ray votes, 1 withheld" in result.stdout
    assert "no occupancy points for sheet: open surface without a clear inside" in result.stdout
    summary = json.loads((out / "dataset.json").read_text())["occupancy_labels"]
    assert summary["counts"] == {"ray parity": 1, "ray votes": 1, "withheld": 1}
    assert [row["object_id"] for row in summary["withheld"]] == ["sheet"]
    assert not (out / "sheet" / "occupancy.npz").exists()
    assert (out / "open_box" / "occupancy.npz").exists()
    meta = json.loads((out / "sheet" / "meta.json").read_text())
    assert meta["occupancy_labels"]["method"] == "withheld"
    dataset = MultiViewDataset(out, "all", cond_size=32)
    items = {item["object_id"]: item for item in (dataset[i] for i in range(len(dataset)))}
    assert "occupancy_points" not in items["sheet"] and "occupancy_points" in items["open_box"]
