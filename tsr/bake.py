"""Texture baking without OpenGL: a UV atlas, texels rasterised in UV space, triplane colours.

Each step is one function:
1. `uv_atlas`: xatlas cuts the mesh into charts and packs them into the unit square; vertices
   on chart seams are split, faces keep their order.
2. `rasterize_uv`: which triangle covers each texel centre, and where (barycentrics). Plain
   torch on any device, no graphics context: it runs headless on a CPU or a GPU.
3. `extend_charts`: seams dilated. Empty texels a few texels around each chart take a
   neighbour's triangle, so bilinear sampling (and the first mipmaps) at a chart's edge reads
   the chart's own colours, not the background.
4. `bake`: a colour function at the 3D points of those texels, on the caller's device
   (`bake_texture`: the triplane's colours, on the triplane's device).

Texel convention, that of OBJ and trimesh (v up): the centre of texel (row i, column j) of a
W x H image is at u = (j + 0.5) / W, v = 1 - (i + 0.5) / H; row 0 is the image's top. glTF
counts v downwards; trimesh converts when it writes and reads GLB.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
import trimesh
import xatlas
from PIL import Image
from trimesh.visual import TextureVisuals
from trimesh.visual.material import SimpleMaterial

ColorFn = Callable[[torch.Tensor], torch.Tensor]  # (N, 3) world points -> (N, 3) in [0, 1]

# TripoSR's run.py default.
DEFAULT_TEXTURE_RESOLUTION = 2048
# Gap kept around each chart, in atlas texels, and how far `extend_charts` grows charts into it:
# enough for bilinear sampling and the first mipmaps to read only a chart's own colours.
PADDING_TEXELS = 4
# A chart's boundary is at most this many mean edge lengths long. xatlas' unbounded chart
# growing took 362 s on a 250k-face marching-cubes mesh (2-core CPU); bounded, 13 s, with
# fewer charts (large charts failed its validity checks and were split again).
CHART_BOUNDARY_EDGES = 64
# Candidate (texel, triangle) pairs tested at once by the rasteriser: about 100 MB of temporaries.
MAX_CANDIDATES = 2**20
# Barycentrics this far below zero still count as inside, so a texel centre exactly on an edge
# is not lost to rounding in both triangles that share it.
INSIDE_TOLERANCE = 1e-9
# The same for texel centres on a bounding box's edge, in texels.
BOX_MARGIN = 1e-6


def uv_atlas(
    vertices: np.ndarray, faces: np.ndarray, resolution: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """xatlas charts packed for a `resolution`² texture.

    (V, 3), (F, 3) -> vertex_map (V',) int64 (the input vertex of each atlas vertex), faces
    (F, 3) int64 into the atlas vertices (same order as the input faces), uv (V', 2) in [0, 1].
    """
    edges = vertices[faces[:, [1, 2, 0]]] - vertices[faces]  # (F, 3, 3)
    charts = xatlas.ChartOptions()
    charts.max_boundary_length = CHART_BOUNDARY_EDGES * float(np.linalg.norm(edges, axis=-1).mean())
    packing = xatlas.PackOptions()
    packing.resolution = resolution
    packing.padding = PADDING_TEXELS
    atlas = xatlas.Atlas()
    atlas.add_mesh(vertices.astype(np.float32), faces.astype(np.uint32))
    atlas.generate(charts, packing)
    if atlas.atlas_count != 1:  # UVs of several atlases would overlap in one texture
        raise RuntimeError(f"xatlas made {atlas.atlas_count} atlases for one texture")
    # xatlas picks the scale, and its atlas often comes out larger than asked (1719² for 1024²
    # on a 250k-face mesh): its UVs, normalised to [0, 1], map onto the texture as they are, and
    # the padding between charts shrinks in proportion (4 -> 2.4 texels there).
    vertex_map, atlas_faces, uv = atlas.get_mesh(0)
    return _place_left_out_faces(vertex_map.astype(np.int64), atlas_faces.astype(np.int64), uv)


def _place_left_out_faces(
    vertex_map: np.ndarray, faces: np.ndarray, uv: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Give xatlas' left-out faces the UV of one of their vertices in a chart.

    xatlas leaves faces below its area threshold out of every chart and puts their UVs at
    (0, 0), inside whatever chart is packed there: 1.5% of a 250k-face marching-cubes mesh
    (median area 400x below the mesh's), coloured from a far-away surface. Each such face gets
    three new vertices at one UV point, that of the first of its corners that a chart holds:
    the face is far smaller than a texel, so that point's colour is its colour. A face with no
    corner in any chart stays at (0, 0).
    """
    left_out = (uv[faces] == 0).all(axis=(1, 2))  # (F,) packing padding keeps charts off (0, 0)
    if not left_out.any():
        return vertex_map, faces, uv
    in_charts = np.unique(faces[~left_out])
    charted = np.full((vertex_map.max() + 1, 2), np.nan, dtype=uv.dtype)  # input vertex -> UV
    charted[vertex_map[in_charts]] = uv[in_charts]
    corners = vertex_map[faces[left_out]]  # (L, 3) input vertices
    options = charted[corners]  # (L, 3, 2)
    first = np.argmax(~np.isnan(options[..., 0]), axis=1)  # (L,) 0 when none is charted
    point = np.nan_to_num(options[np.arange(len(corners)), first])  # (L, 2)
    faces = faces.copy()
    faces[left_out] = len(vertex_map) + np.arange(corners.size).reshape(-1, 3)
    vertex_map = np.concatenate([vertex_map, corners.ravel()])
    uv = np.concatenate([uv, np.repeat(point, 3, axis=0)])
    used, faces = np.unique(faces, return_inverse=True)  # drop vertices no face uses now
    return vertex_map[used], faces.reshape(-1, 3), uv[used]


def uv_to_pixel(uv: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """(..., 2) UVs -> (..., 2) continuous pixel coordinates (x right, y down); texel (i, j)
    has its centre at (j + 0.5, i + 0.5)."""
    return torch.stack([uv[..., 0] * width, (1 - uv[..., 1]) * height], dim=-1)


def _cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """z of the 2D cross product. (..., 2), (..., 2) -> (...)"""
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def _barycentric(corners: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Barycentric weights of 2D points, negative outside. (M, 3, 2), (M, 2) -> (M, 3)"""
    a, b, c = (corners[:, k] - points for k in range(3))
    weights = torch.stack([_cross(b, c), _cross(c, a), _cross(a, b)], dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True)  # the sum is twice the signed area


def _chunks_by_count(counts: torch.Tensor, budget: int) -> tuple[torch.Tensor, ...]:
    """Consecutive index ranges whose counts sum to about `budget` (more for one big item)."""
    group = (counts.cumsum(0) - counts) // budget  # (F,) non-decreasing
    sizes = torch.unique_consecutive(group, return_counts=True)[1]
    return torch.arange(len(counts), device=counts.device).split(sizes.tolist())


def _texel_centres(texel: torch.Tensor, n: int) -> torch.Tensor:
    """Flat texel indices (M,) -> their centres (M, 2) in pixel coordinates."""
    return torch.stack([texel % n, texel // n], dim=-1).double() + 0.5


def rasterize_uv(
    uv: torch.Tensor, faces: torch.Tensor, resolution: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The triangle that covers each texel centre of a `resolution`² texture, and where.

    uv (V, 2), faces (F, 3) -> face_index (N, N) int64 (-1: no triangle), barycentric (N, N, 3)
    float64 (zero where empty). A centre inside several triangles (on a shared edge, or where
    charts overlap) belongs to the one with the lowest index, so each texel has one owner.
    """
    n = resolution
    device = uv.device
    corners = uv_to_pixel(uv.double(), n, n)[faces]  # (F, 3, 2)
    a, b, c = corners.unbind(1)  # (F, 2) each
    degenerate = _cross(b - a, c - a) == 0  # (F,)
    # Texel centres j + 0.5 inside each triangle's bounding box, widened by a rounding margin so
    # a centre on a box edge (and so maybe on the triangle's edge) is still tested.
    low = torch.ceil(corners.amin(1) - 0.5 - BOX_MARGIN).clamp(min=0).long()  # (F, 2) as (x, y)
    high = torch.floor(corners.amax(1) - 0.5 + BOX_MARGIN).clamp(max=n - 1).long()
    size = (high - low + 1).clamp(min=0)  # (F, 2)
    counts = torch.where(degenerate, 0, size[:, 0] * size[:, 1])  # (F,)

    owner = torch.full((n * n,), len(faces), dtype=torch.long, device=device)
    barycentric = torch.zeros(n * n, 3, dtype=torch.float64, device=device)
    for face_ids in _chunks_by_count(counts, MAX_CANDIDATES):
        per_face = counts[face_ids]
        face = face_ids.repeat_interleave(per_face)  # (M,) one row per candidate texel
        first = (per_face.cumsum(0) - per_face).repeat_interleave(per_face)
        local = torch.arange(len(face), device=device) - first  # index inside the bounding box
        texel = (low[face, 1] + local // size[face, 0]) * n + low[face, 0] + local % size[face, 0]
        weights = _barycentric(corners[face], _texel_centres(texel, n))  # (M, 3)
        inside = (weights >= -INSIDE_TOLERANCE).all(dim=-1)
        face, texel, weights = face[inside], texel[inside], weights[inside]
        # Chunks come in face order, so an owner from an earlier chunk is never replaced.
        owner.scatter_reduce_(0, texel, face, reduce="amin")
        won = owner[texel] == face
        barycentric[texel[won]] = weights[won]
    face_index = torch.where(owner == len(faces), -1, owner)
    return face_index.view(n, n), barycentric.view(n, n, 3)


def extend_charts(
    face_index: torch.Tensor, uv: torch.Tensor, faces: torch.Tensor, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Give a triangle to the empty texels that bilinear sampling reads beside the charts.

    First the texel under each triangle's UV centroid, if empty (a triangle too thin to cover
    a texel centre still gets its colour); then, `steps` times, each empty texel next to a
    claimed one takes a neighbour's triangle. A claimed texel's point is on its triangle, near
    its centre (barycentrics clamped to the triangle), so the texels beyond a seam continue the
    chart's own colours.

    face_index (N, N) from `rasterize_uv`, uv (V, 2), faces (F, 3) -> claimed (N, N) int64
    (-1: still empty), barycentric (M, 3) float64 of the texels newly claimed, row-major.
    """
    n = face_index.shape[0]
    corners = uv_to_pixel(uv.double(), n, n)[faces]  # (F, 3, 2)
    a, b, c = corners.unbind(1)
    usable = (_cross(b - a, c - a) != 0).nonzero()[:, 0]  # degenerate triangles have no point
    centroid = corners[usable].mean(dim=1).floor().long().clamp(0, n - 1)  # (F', 2) as (x, y)
    seeds = torch.full((n * n,), len(faces), dtype=torch.long, device=uv.device)
    seeds.scatter_reduce_(0, centroid[:, 1] * n + centroid[:, 0], usable, reduce="amin")
    claimed = face_index.flatten()
    claimed = torch.where((claimed < 0) & (seeds < len(faces)), seeds, claimed)
    claimed = claimed.view(1, 1, n, n)
    for _ in range(steps):
        # Indices as float64 are exact; max pooling picks one neighbour's triangle.
        neighbour = F.max_pool2d(claimed.double(), 3, stride=1, padding=1).long()
        claimed = torch.where(claimed < 0, neighbour, claimed)
    claimed = claimed.view(n, n)
    new = ((claimed >= 0) & (face_index < 0)).flatten().nonzero()[:, 0]  # (M,) flat texels
    weights = _barycentric(corners[claimed.flatten()[new]], _texel_centres(new, n)).clamp(min=0)
    return claimed, weights / weights.sum(dim=-1, keepdim=True)


def sample_texture(texture: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear texture lookup at UVs, in the convention above, clamped at the borders.

    (H, W, C) uint8, (N, 2) -> (N, C) float in [0, 1]
    """
    height, width = texture.shape[:2]
    image = torch.tensor(texture).permute(2, 0, 1)[None].float() / 255.0  # (1, C, H, W)
    pixel = uv_to_pixel(torch.as_tensor(uv, dtype=torch.float64), width, height)
    grid = pixel / torch.tensor([width, height], dtype=torch.float64) * 2 - 1  # (N, 2)
    sampled = F.grid_sample(
        image, grid[None, None].float(), mode="bilinear", padding_mode="border", align_corners=False
    )  # (1, C, 1, N)
    return sampled[0, :, 0].T.numpy()


def bake(
    mesh: trimesh.Trimesh, color_fn: ColorFn, resolution: int, device: torch.device | str
) -> trimesh.Trimesh:
    """The mesh with a UV atlas and a `resolution`² texture of color_fn on its surface.

    color_fn receives (N, 3) float32 points on `device`. The result has split seam vertices,
    the input's faces in the same order, and a TextureVisuals whose image is an RGB PIL image.
    """
    if len(mesh.faces) == 0:
        raise ValueError("the mesh is empty: nothing to bake (a lower threshold gives a surface)")
    vertex_map, faces, uv = uv_atlas(np.asarray(mesh.vertices), np.asarray(mesh.faces), resolution)
    vertices = np.asarray(mesh.vertices)[vertex_map]  # (V', 3)
    faces_t = torch.from_numpy(faces).to(device)
    uv_t = torch.from_numpy(uv).to(device)
    face_index, barycentric = rasterize_uv(uv_t, faces_t, resolution)
    claimed, extra_weights = extend_charts(face_index, uv_t, faces_t, PADDING_TEXELS)
    barycentric[(claimed >= 0) & (face_index < 0)] = extra_weights
    covered = claimed >= 0  # (N, N)
    corners = torch.from_numpy(vertices).to(device)[faces_t[claimed[covered]]]  # (M, 3, 3)
    points = torch.einsum("mk,mkd->md", barycentric[covered], corners).float()  # (M, 3)
    with torch.inference_mode():
        colors = color_fn(points).float()
    texture = torch.zeros(resolution, resolution, 3, device=device)
    texture[covered] = colors
    pixels = (texture.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    # White diffuse: GLB viewers multiply the texture by it (trimesh's default grey darkens).
    material = SimpleMaterial(
        name="texture", image=Image.fromarray(pixels), diffuse=[255, 255, 255, 255]
    )
    return trimesh.Trimesh(
        vertices=vertices,
        faces=faces,
        visual=TextureVisuals(uv=uv, material=material),
        process=False,  # merging vertices would undo the seams the atlas needs
    )


def bake_texture(
    model: torch.nn.Module,
    scene_code: torch.Tensor,
    mesh: trimesh.Trimesh,
    resolution: int = DEFAULT_TEXTURE_RESOLUTION,
) -> trimesh.Trimesh:
    """A TSR scene's colours baked into a texture on `mesh` (from `model.extract_mesh`).

    scene_code (3, C, 2P, 2P): one scene. Every step runs on its device (TripoSR's bake sent
    CPU points to a CUDA triplane and crashed).
    """

    def color(points: torch.Tensor) -> torch.Tensor:
        return model.renderer.query_triplane(model.decoder, points, scene_code)["color"]

    return bake(mesh, color, resolution, scene_code.device)
