"""CPU multi-view renderer for dataset building: mesh + cameras -> RGBA, depth.

Why ray casting with Embree (embreex through trimesh) rather than EGL rasterisation:
- the rays are *exactly* `tsr.cameras.rays_from_c2w`'s, the rays the volume renderer marches,
  so a rendered pixel and a NeRF ray can never disagree (no projection matrix, no near/far
  planes, no pixel-centre convention to match);
- depth comes out as the metric distance along that unit ray, which is what a depth loss on
  the volume renderer needs, without un-projecting a z-buffer;
- it is headless by construction: no display, no GL driver, no EGL device, so it runs the
  same on a laptop, in CI and in a container; Embree casts about 1.5 M rays/s per core here.

Shading is Lambert + ambient under lights fixed in the world, so an object's colour does not
change with the viewpoint: the triplane NeRF models view-independent colour. The base colour
is looked up per ray hit (`utils.data.materials`): textures are sampled at the hit's
interpolated UV, so views keep detail finer than the mesh's vertex spacing. Edges are
anti-aliased by supersampling only the pixels next to a silhouette or a colour change with an
odd n x n grid; the odd grid contains the pixel centre, so alpha > 0 wherever the centre ray
(the one `depth` belongs to) hits, and alpha = 1 implies it hit.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import trimesh
from scipy.ndimage import maximum_filter, minimum_filter
from trimesh.ray.ray_pyembree import RayMeshIntersector

from tsr.cameras import pixel_to_ray, rays_from_c2w
from utils.data.dataset import DEPTH_BACKGROUND
from utils.data.materials import UNTEXTURED_COLOUR, Appearance, appearance_of

AMBIENT = 0.35
# (direction towards the light, intensity): a key light above the conditioning camera (+x)
# and a weaker fill from the opposite side, so no side of an object is left flat.
LIGHTS = (((1.0, 0.6, 1.2), 0.6), ((-1.0, -0.8, 0.3), 0.25))
CREASE_DEG = 30.0  # faces meeting at a sharper angle than this are shaded flat across the edge
EDGE_COLOUR_STEP = 0.06  # a neighbour colour difference above this marks a pixel for supersampling


def crease_normals(mesh: trimesh.Trimesh, crease_deg: float = CREASE_DEG) -> np.ndarray:
    """Per-corner shading normals: smooth across soft edges, sharp across creases.

    Each corner's normal averages (area-weighted) the normals of the faces around its vertex
    that lie within `crease_deg` of its own face. -> (F, 3, 3)
    """
    faces = np.asarray(mesh.faces)
    face_normals, areas = mesh.face_normals, mesh.area_faces
    corner_vertex = faces.ravel()  # (3F,)
    # faces around each vertex, via the corners sorted by vertex
    order = np.argsort(corner_vertex, kind="stable")
    first = np.searchsorted(corner_vertex[order], corner_vertex)  # (3F,)
    valence = np.bincount(corner_vertex, minlength=len(mesh.vertices))[corner_vertex]  # (3F,)
    corner = np.repeat(np.arange(len(corner_vertex)), valence)  # (P,) pairs (corner, face)
    offset = np.arange(len(corner)) - np.repeat(np.cumsum(valence) - valence, valence)
    neighbour = order[np.repeat(first, valence) + offset] // 3  # (P,)
    own = corner // 3
    similar = np.einsum("pc,pc->p", face_normals[own], face_normals[neighbour]) > np.cos(
        np.radians(crease_deg)
    )
    weight = areas[neighbour] * similar  # (P,)
    normals = np.stack(
        [
            np.bincount(
                corner, weights=weight * face_normals[neighbour, c], minlength=len(faces) * 3
            )
            for c in range(3)
        ],
        axis=-1,
    )  # (3F, 3)
    length = np.linalg.norm(normals, axis=-1, keepdims=True)
    flat = np.repeat(face_normals, 3, axis=0)  # (3F, 3) fallback for degenerate corners
    normals = np.where(length > 1e-12, normals / np.maximum(length, 1e-12), flat)
    return normals.reshape(-1, 3, 3)


class Shader:
    """Casts rays against one mesh and shades the hits; `shade` also serves points that were
    not found by a ray (occupancy samples' colours).

    appearance: per-face materials (`utils.data.meshes.read_mesh`); by default the mesh's own
    visual. untextured: sRGB colour of faces the file gives no colour.
    """

    def __init__(
        self,
        mesh: trimesh.Trimesh,
        appearance: Appearance | None = None,
        untextured: np.ndarray | tuple = UNTEXTURED_COLOUR,
    ):
        self.mesh = mesh
        self.appearance = appearance_of(mesh) if appearance is None else appearance
        if len(self.appearance.face_material) != len(mesh.faces):
            raise ValueError(
                f"appearance describes {len(self.appearance.face_material)} faces, the mesh "
                f"has {len(mesh.faces)}: pass the appearance read with this mesh"
            )
        self.untextured = np.asarray(untextured, dtype=np.float64)
        self.corner_normals = crease_normals(mesh)  # (F, 3, 3)
        self.lights = [(np.asarray(d) / np.linalg.norm(d), i) for d, i in LIGHTS]

    @functools.cached_property
    def intersector(self) -> RayMeshIntersector:
        return RayMeshIntersector(self.mesh)

    def cast(
        self, origins: np.ndarray, directions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(N, 3) unit rays -> hit (N,) bool, distance (N,), colour (N, 3) (0 where missed)."""
        face_index, ray_index, points = self.intersector.intersects_id(
            origins, directions, multiple_hits=False, return_locations=True
        )
        hit = np.zeros(len(origins), dtype=bool)
        hit[ray_index] = True
        distance = np.full(len(origins), DEPTH_BACKGROUND)
        distance[ray_index] = np.linalg.norm(points - origins[ray_index], axis=-1)
        colour = np.zeros((len(origins), 3))
        if len(ray_index):
            colour[ray_index] = self.shade(face_index, points, directions[ray_index])
        return hit, distance, colour

    def shade(
        self, face_index: np.ndarray, points: np.ndarray, directions: np.ndarray
    ) -> np.ndarray:
        """Colours (N, 3) in [0, 1] of surface points on faces `face_index`, seen along
        `directions` (N, 3) (the side facing against them is lit)."""
        barycentric = trimesh.triangles.points_to_barycentric(
            self.mesh.triangles[face_index], points
        )
        normals = np.einsum("nk,nkc->nc", barycentric, self.corner_normals[face_index])
        normals /= np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-12)
        # light the side the ray sees, so open or inverted meshes are not black
        normals *= -np.sign(np.einsum("nc,nc->n", normals, directions))[:, None]
        light = np.full(len(points), AMBIENT)
        for direction, intensity in self.lights:
            light += intensity * np.clip(normals @ direction, 0, None)
        base = self.appearance.base_colours(face_index, barycentric, self.untextured)
        return np.clip(base * light[:, None], 0, 1)


def render_views(
    mesh: trimesh.Trimesh,
    c2w: torch.Tensor | np.ndarray,
    fovy_deg: float,
    size: int,
    antialias: int = 5,
    *,
    appearance: Appearance | None = None,
    untextured: np.ndarray | tuple = UNTEXTURED_COLOUR,
) -> dict[str, np.ndarray]:
    """Render a mesh from cameras in TripoSR's world (appearance, untextured: see Shader).

    c2w (V, 4, 4) camera-to-world -> dict with
      rgba (V, H, W, 4) uint8, straight (not premultiplied) colour, alpha = pixel coverage;
      depth (V, H, W) float32, distance along the pixel centre's unit tsr ray to the first
        surface, DEPTH_BACKGROUND (0) where that ray misses;
      n_supersampled: pixels rendered with antialias^2 rays.
    """
    if antialias % 2 != 1:
        raise ValueError(
            f"antialias must be odd so the grid contains the pixel centre, got {antialias}"
        )
    c2w = torch.as_tensor(np.asarray(c2w), dtype=torch.float32)
    n_views = c2w.shape[0]
    shader = Shader(mesh, appearance, untextured)
    rays_o, rays_d = rays_from_c2w(c2w, size, size, fovy_deg)  # (V, H, W, 3) each
    hit, depth, colour = shader.cast(
        rays_o.reshape(-1, 3).double().numpy(), rays_d.reshape(-1, 3).double().numpy()
    )
    hit = hit.reshape(n_views, size, size)
    colour = colour.reshape(n_views, size, size, 3)
    coverage = hit.astype(np.float64)
    premultiplied = colour * coverage[..., None]

    # pixels whose 3x3 neighbourhood changes coverage or colour get supersampled
    window = (1, 3, 3)
    edges = maximum_filter(hit, size=window) != minimum_filter(hit, size=window)
    for c in range(3):
        edges |= (
            maximum_filter(colour[..., c], size=window)
            - minimum_filter(colour[..., c], size=window)
            > EDGE_COLOUR_STEP
        )
    view, row, col = np.nonzero(edges)
    if len(view):
        offsets = (np.arange(antialias) + 0.5) / antialias - 0.5  # (A,) sub-pixel, centre included
        dj, di = np.meshgrid(offsets, offsets, indexing="ij")
        sub = np.stack([dj.ravel(), di.ravel()], axis=-1)  # (A*A, 2) as (row, col)
        sub_hit = np.zeros((len(view), len(sub)), dtype=bool)
        sub_colour = np.zeros((len(view), len(sub), 3))
        for v in np.unique(view):
            in_view = view == v
            pixels = np.stack([row[in_view], col[in_view]], axis=-1)[:, None] + sub  # (n, A*A, 2)
            origins, directions = pixel_to_ray(
                c2w[v], torch.from_numpy(pixels.reshape(-1, 2)), size, size, fovy_deg
            )
            h, _, c = shader.cast(origins.double().numpy(), directions.double().numpy())
            sub_hit[in_view] = h.reshape(-1, len(sub))
            sub_colour[in_view] = c.reshape(-1, len(sub), 3)
        # the centre sample is the primary ray: reuse it so alpha and depth agree to the bit
        centre = len(sub) // 2
        sub_hit[:, centre] = hit[view, row, col]
        sub_colour[:, centre] = colour[view, row, col]
        coverage[view, row, col] = sub_hit.mean(axis=1)
        premultiplied[view, row, col] = (sub_colour * sub_hit[..., None]).mean(axis=1)

    straight = premultiplied / np.maximum(coverage, 1e-12)[..., None]
    rgba = np.concatenate([straight, coverage[..., None]], axis=-1)
    return {
        "rgba": np.round(np.clip(rgba, 0, 1) * 255).astype(np.uint8),
        "depth": depth.reshape(n_views, size, size).astype(np.float32),
        "n_supersampled": len(view),
    }
