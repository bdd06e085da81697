"""What a mesh's faces look like: base colour per face from materials, textures and colours.

A scene flattened into one mesh keeps each primitive's own material: `Appearance` holds per
face an index into a material list, the texture coordinates and the colours of its corners,
so the dataset renderer looks colours up per pixel (`visual.to_color()` keeps one colour per
vertex and loses every detail finer than the vertex spacing).

Colour spaces, as glTF defines them and GPUs implement them:
- texture images hold sRGB values; texels are decoded to linear light *before* bilinear
  filtering (a GPU's sRGB textures do the same), so filtering does not darken edges;
- factors (glTF baseColorFactor, MTL Kd) are linear and multiply the texture in linear light;
  the product is encoded back to sRGB, so a texel under full light renders as its own value;
- vertex and face colours are display (sRGB) values, as PLY/OBJ files and trimesh's glTF
  exports (every mesh.glb this project wrote) store them - glTF's COLOR_0 is linear by
  specification, a deviation kept so our own files read back unchanged - and multiply the
  encoded product. Under a pure power law that product is the linear-light product; the sRGB
  curve departs from one only near black. Meshes with only colours (the procedural shapes)
  therefore render exactly as they did before materials.
Texture alpha is ignored: a view's alpha is pixel coverage.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
import trimesh

# Colour of surfaces the file gives no colour (STL, bare OBJ, glTF primitives without a
# material), sRGB. A saturated clay orange rather than grey: lit surfaces span 0.35-1.2 x the
# base colour, and grey 0.7 crosses TripoSR's 0.5-grey conditioning background at light 0.71,
# where a face vanishes into it; a saturated colour differs from any grey in hue at every
# light level, and stays far from the white supervision background too.
UNTEXTURED_COLOUR = (0.9, 0.55, 0.2)
UNCOLOURED = -1  # face_material of faces painted with the untextured colour
WRAP_MODES = ("repeat", "clamp", "mirror")  # glTF's REPEAT, CLAMP_TO_EDGE, MIRRORED_REPEAT


def srgb_to_linear(value: np.ndarray) -> np.ndarray:
    value = np.asarray(value, dtype=np.float64)
    return np.where(value <= 0.04045, value / 12.92, ((value + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(value: np.ndarray) -> np.ndarray:
    value = np.clip(value, 0.0, 1.0)
    return np.where(value <= 0.0031308, value * 12.92, 1.055 * value ** (1 / 2.4) - 0.055)


SRGB8_TO_LINEAR = srgb_to_linear(np.arange(256) / 255.0)  # (256,) texel decoding table


def untextured_setting(untextured: str | tuple | np.ndarray) -> str | list[float]:
    """The untextured choice as settings record it: "palette" or [r, g, b] in [0, 1]."""
    if isinstance(untextured, str):
        if untextured != "palette":
            raise ValueError(f"untextured must be 'palette' or an sRGB colour, got {untextured!r}")
        return untextured
    colour = [float(c) for c in untextured]
    if len(colour) != 3 or not all(0.0 <= c <= 1.0 for c in colour):
        raise ValueError(f"untextured colour must be three values in [0, 1], got {colour}")
    return colour


def untextured_colour(setting: str | list[float], rng: np.random.Generator) -> np.ndarray:
    """One object's untextured colour: the setting's, or for "palette" a seeded saturated
    colour (any hue, saturation 0.7, value 0.9), so a CAD set need not be one colour.
    -> (3,) sRGB"""
    if setting == "palette":
        return np.array(colorsys.hsv_to_rgb(rng.uniform(), 0.7, 0.9))
    return np.asarray(setting, dtype=np.float64)


@dataclass(frozen=True)
class Material:
    """A base colour: factor x texture, in linear light."""

    factor: np.ndarray  # (3,) linear RGB (glTF baseColorFactor, MTL Kd)
    texture: np.ndarray | None = None  # (H, W, 3) uint8 sRGB, row 0 at v = 1 (the image's top)
    wrap: tuple[str, str] = ("repeat", "repeat")  # outside [0, 1] along u, v: WRAP_MODES

    @property
    def plain(self) -> bool:
        """White without a texture: leaves colours as they are."""
        return self.texture is None and bool(np.all(self.factor == 1.0))


def _wrap_index(index: np.ndarray, n: int, mode: str) -> np.ndarray:
    if mode == "repeat":
        return index % n
    if mode == "clamp":
        return np.clip(index, 0, n - 1)
    if mode == "mirror":  # period 2n: 0..n-1 then n-1..0
        folded = index % (2 * n)
        return np.where(folded < n, folded, 2 * n - 1 - folded)
    raise ValueError(f"wrap mode must be one of {WRAP_MODES}, got {mode!r}")


def sample_texture(texture: np.ndarray, uv: np.ndarray, wrap: tuple[str, str]) -> np.ndarray:
    """Bilinear lookup in linear light. texture (H, W, 3) uint8 sRGB, uv (N, 2) with v up
    (texel centres at ((i + 0.5) / W, 1 - (j + 0.5) / H)). -> (N, 3) linear RGB"""
    height, width = texture.shape[:2]
    uv = np.nan_to_num(np.asarray(uv, dtype=np.float64), posinf=0.0, neginf=0.0)
    x = uv[:, 0] * width - 0.5  # (N,) continuous column, 0 at the first texel's centre
    y = (1.0 - uv[:, 1]) * height - 0.5
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
    cols = [_wrap_index(x0 + k, width, wrap[0]) for k in (0, 1)]
    rows = [_wrap_index(y0 + k, height, wrap[1]) for k in (0, 1)]

    def texel(row: np.ndarray, col: np.ndarray) -> np.ndarray:
        return SRGB8_TO_LINEAR[texture[row, col]]  # (N, 3)

    top = texel(rows[0], cols[0]) * (1 - fx) + texel(rows[0], cols[1]) * fx
    bottom = texel(rows[1], cols[0]) * (1 - fx) + texel(rows[1], cols[1]) * fx
    return top * (1 - fy) + bottom * fy


@dataclass(frozen=True)
class Appearance:
    """Per face of one mesh (in its face order): material, texture coordinates, colours."""

    face_material: np.ndarray  # (F,) int: index into materials, UNCOLOURED: no colour given
    materials: tuple[Material, ...] = ()
    uv: np.ndarray | None = None  # (F, 3, 2) texture coordinates of the corners, v up
    colour: np.ndarray | None = None  # (F, 3) per face or (F, 3, 3) per corner, sRGB in [0, 1]

    def base_colours(
        self, face_index: np.ndarray, barycentric: np.ndarray, untextured: np.ndarray
    ) -> np.ndarray:
        """Unlit sRGB colour at points given by face and barycentric coordinates (N, 3);
        `untextured` (3,) paints UNCOLOURED faces. -> (N, 3) in [0, 1]"""
        if not self.materials:  # no face has a colour (STL, CAD): one colour, nothing to look up
            return np.broadcast_to(untextured, (len(face_index), 3))
        if self.colour is None:
            colour = np.ones((len(face_index), 3))
        elif self.colour.ndim == 2:
            colour = self.colour[face_index]
        else:
            colour = np.einsum("nk,nkc->nc", barycentric, self.colour[face_index])
        material = self.face_material[face_index]
        if self.has_uncoloured:
            colour = np.where((material == UNCOLOURED)[:, None], untextured, colour)
        if self.styled:  # materials other than plain white: grouped, one lookup per material
            order = np.argsort(material, kind="stable")
            present, starts = np.unique(material[order], return_index=True)
            for m, hits in zip(present, np.split(order, starts[1:]), strict=True):
                if m == UNCOLOURED or self.materials[m].plain:
                    continue
                linear = np.broadcast_to(self.materials[m].factor, (len(hits), 3))
                if self.materials[m].texture is not None and self.uv is not None:
                    uv = np.einsum("nk,nkc->nc", barycentric[hits], self.uv[face_index[hits]])
                    linear = linear * sample_texture(
                        self.materials[m].texture, uv, self.materials[m].wrap
                    )
                colour[hits] *= linear_to_srgb(linear)
        return colour

    @property
    def has_uncoloured(self) -> bool:
        return bool((self.face_material == UNCOLOURED).any())

    @property
    def styled(self) -> bool:
        return any(not m.plain for m in self.materials)

    def vertex_colours(self, mesh: trimesh.Trimesh, untextured: np.ndarray) -> np.ndarray:
        """Base colours averaged over each vertex's corners: a preview for viewers and mesh
        files, which hold one colour per vertex. -> (V, 3) sRGB"""
        n_faces = len(mesh.faces)
        corners = self.base_colours(
            np.repeat(np.arange(n_faces), 3), np.tile(np.eye(3), (n_faces, 1)), untextured
        )  # (3F, 3)
        vertex = np.asarray(mesh.faces).ravel()
        count = np.maximum(np.bincount(vertex, minlength=len(mesh.vertices)), 1)
        return np.stack(
            [np.bincount(vertex, corners[:, c], minlength=len(mesh.vertices)) for c in range(3)],
            axis=-1,
        ) / count[:, None]

    def reversed_corners(self) -> Appearance:
        """For faces whose corner order was reversed (a mirroring transform)."""
        return Appearance(
            self.face_material,
            self.materials,
            None if self.uv is None else self.uv[:, ::-1],
            self.colour if self.colour is None or self.colour.ndim == 2 else self.colour[:, ::-1],
        )


def _unit_colours(values: np.ndarray) -> np.ndarray:
    """Colours as files store them (uint8, uint16 or float) -> float RGB in [0, 1]."""
    values = np.asarray(values)
    if np.issubdtype(values.dtype, np.integer):
        values = values / np.iinfo(values.dtype).max
    return np.clip(values[..., :3].astype(np.float64), 0.0, 1.0)


def _material(
    source: trimesh.visual.material.Material, wrap: tuple[str, str], textures: dict
) -> Material | None:
    """trimesh's PBR (glTF) or simple (OBJ/MTL) material -> ours; None for other kinds.
    `textures` caches converted images by identity: primitives often share one."""
    if isinstance(source, trimesh.visual.material.PBRMaterial):
        factor, image = source.baseColorFactor, source.baseColorTexture
    elif isinstance(source, trimesh.visual.material.SimpleMaterial):
        # MTL: map_Kd replaces Kd, as Blender's importer and trimesh's to_color() read it
        # (exporters write Kd 0.8 beside textures; trimesh fills a missing Kd with 0.4)
        factor, image = (None, source.image) if source.image is not None else (source.diffuse, None)
    else:
        return None
    if image is not None and id(image) not in textures:
        textures[id(image)] = np.asarray(image.convert("RGB"))
    return Material(
        factor=np.ones(3) if factor is None else _unit_colours(factor),
        texture=None if image is None else textures[id(image)],
        wrap=wrap,
    )


def appearance_of(
    mesh: trimesh.Trimesh, wraps: dict | None = None, textures: dict | None = None
) -> Appearance:
    """The appearance one trimesh geometry's visual describes. `wraps`: material name ->
    (wrap u, wrap v), which trimesh does not keep (glTF samplers); `textures`: a cache of
    converted images, shared across the geometries of one file."""
    faces = np.asarray(mesh.faces)
    visual = mesh.visual
    textures = {} if textures is None else textures
    if isinstance(visual, trimesh.visual.TextureVisuals):
        name = getattr(visual.material, "name", None)
        material = _material(visual.material, (wraps or {}).get(name, ("repeat",) * 2), textures)
        if material is None:  # a material kind we do not read: trimesh's per-vertex colours
            coloured = trimesh.Trimesh(mesh.vertices, faces, process=False)
            coloured.visual = visual.to_color()
            return appearance_of(coloured)
        uv = None
        if visual.uv is not None and len(visual.uv) == len(mesh.vertices):
            uv = np.asarray(visual.uv, dtype=np.float64)[faces]
        colour = visual.vertex_attributes.get("color")
        if colour is not None and len(colour) == len(mesh.vertices):  # glTF COLOR_0 + material
            colour = _unit_colours(colour)[faces]
        else:
            colour = None
        return Appearance(np.zeros(len(faces), np.int64), (material,), uv, colour)
    kind = visual.kind if isinstance(visual, trimesh.visual.ColorVisuals) else None
    if kind is None:
        return Appearance(np.full(len(faces), UNCOLOURED, np.int64))
    if kind == "vertex":
        colour = visual.vertex_colors[faces, :3] / 255.0  # (F, 3, 3)
    else:
        colour = visual.face_colors[:, :3] / 255.0  # (F, 3)
    plain = Material(factor=np.ones(3))
    return Appearance(np.zeros(len(faces), np.int64), (plain,), None, colour)


def concatenate(parts: list[Appearance]) -> Appearance:
    """Appearances of meshes whose faces are concatenated in this order."""
    offsets = np.cumsum([0] + [len(p.materials) for p in parts])
    face_material = np.concatenate(
        [
            np.where(p.face_material == UNCOLOURED, UNCOLOURED, p.face_material + offset)
            for p, offset in zip(parts, offsets, strict=False)
        ]
    )
    materials = tuple(m for p in parts for m in p.materials)
    uv = None
    if any(p.uv is not None for p in parts):
        uv = np.concatenate(
            [np.zeros((len(p.face_material), 3, 2)) if p.uv is None else p.uv for p in parts]
        )
    colour = None
    if any(p.colour is not None for p in parts):
        per_corner = any(p.colour is not None and p.colour.ndim == 3 for p in parts)
        blocks = []
        for p in parts:
            block = np.ones((len(p.face_material), 3)) if p.colour is None else p.colour
            if per_corner and block.ndim == 2:
                block = np.repeat(block[:, None], 3, axis=1)
            blocks.append(block)
        colour = np.concatenate(blocks)
    return Appearance(face_material, materials, uv, colour)
