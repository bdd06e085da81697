"""See a mesh in a notebook: an orbitable pythreejs widget, and a static picture of it.

The widget needs a live kernel and a widget frontend (JupyterLab with ipywidgets and
pythreejs's extension). A notebook executed headless and saved to disk, or exported to HTML
offline, has neither, and one cannot tell from the kernel what will look at the output later.
So by default every `show_*` call draws the widget AND, below it, a strip of fixed views
rendered with matplotlib: the saved notebook still shows the mesh.

`mode` picks what is drawn; when it is None the environment variable
WORKBOOK_STATIC_VIEWER=1 means "static":
  "both"    widget + static strip (default)
  "widget"  the widget only
  "static"  the static strip only (also used when pythreejs or ipywidgets is not installed)
"""

from __future__ import annotations

import importlib.util
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import trimesh
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure

from tsr.cameras import look_at, orbit_positions
from utils.plots import figure_png

DISPLAY_MODES = ("both", "widget", "static")
FOVY_DEG = 40.0  # shared by the widget camera and the static views, so both frame alike
WIDGET_VIEW = (30.0, 20.0)  # (azimuth, elevation) in degrees of the widget's first view
STATIC_VIEWS = ((30.0, 20.0), (120.0, 20.0), (210.0, 20.0), (300.0, 20.0))
GREY = np.array([0.7, 0.7, 0.7], dtype=np.float32)  # meshes without colours
AMBIENT = 0.35  # light on faces turned from every light, so they stay readable
# The static picture's light, in camera space (right, up, back): a headlight a little up
# and right, so whichever side a fixed view shows is lit.
HEADLIGHT_CAM = np.array([0.3, 0.5, 1.0]) / np.linalg.norm([0.3, 0.5, 1.0])
# Widget lights are fixed in the world (up is +z), not riding on the camera: linked views
# share one camera, and a three.js camera with a light attached can live in one scene only.
# A key light from above-front and a weaker fill from behind give every side its own shade.
KEY_LIGHT = ((1.0, 0.6, 1.4), 0.55)  # (direction towards the light, intensity)
FILL_LIGHT = ((-1.0, -0.8, 0.2), 0.25)
# The static picture coarsens bigger meshes on a grid of this many cells across: a panel is
# about 200 px wide, so finer faces cost drawing time (8 s at 300k faces) and add nothing.
STATIC_MAX_FACES = 30_000
STATIC_GRID_CELLS = 64


def resolve_display_mode(mode: str | None = None) -> str:
    """'both' | 'widget' | 'static', falling back to 'static' without a widget toolkit."""
    if mode is None:
        mode = "static" if os.environ.get("WORKBOOK_STATIC_VIEWER") == "1" else "both"
    if mode not in DISPLAY_MODES:
        raise ValueError(f"display mode {mode!r} unknown: use one of {DISPLAY_MODES}")
    toolkit = all(importlib.util.find_spec(name) for name in ("pythreejs", "ipywidgets"))
    return mode if toolkit else "static"


def as_trimesh(mesh: trimesh.Trimesh | str | Path) -> trimesh.Trimesh:
    """A Trimesh, or a mesh file (OBJ/GLB/PLY…) loaded and merged into one."""
    if isinstance(mesh, trimesh.Trimesh):
        return mesh
    if isinstance(mesh, str | Path):
        path = Path(mesh)
        if not path.is_file():
            raise FileNotFoundError(f"mesh file not found: {path}")
        return trimesh.load(path, force="mesh")
    raise TypeError(f"expected a trimesh.Trimesh or a mesh file path, got {type(mesh).__name__}")


def mesh_colors(mesh: trimesh.Trimesh) -> tuple[np.ndarray, str]:
    """RGB in [0, 1] and where it lives: ((V, 3), 'vertex') | ((F, 3), 'face') | ((0, 3), 'none')."""
    visual = mesh.visual
    if visual.kind == "texture":
        visual = visual.to_color()  # samples the texture at the vertices
    if visual.kind == "vertex":
        return np.asarray(visual.vertex_colors)[:, :3].astype(np.float32) / 255.0, "vertex"
    if visual.kind == "face":
        return np.asarray(visual.face_colors)[:, :3].astype(np.float32) / 255.0, "face"
    return np.zeros((0, 3), dtype=np.float32), "none"


def face_colors(mesh: trimesh.Trimesh) -> np.ndarray:
    """One RGB in [0, 1] per face: (F, 3)."""
    colors, where = mesh_colors(mesh)
    if where == "vertex":
        return colors[mesh.faces].mean(axis=1)
    if where == "face":
        return colors
    return np.broadcast_to(GREY, (len(mesh.faces), 3))


def geometry_arrays(mesh: trimesh.Trimesh) -> dict[str, np.ndarray]:
    """Arrays for a three.js BufferGeometry: position, normal, color (N, 3) float32 and,
    for an indexed mesh, index (3F,) uint32."""
    colors, where = mesh_colors(mesh)
    if where == "face":
        # three.js colours vertices, not faces: give every face three vertices of its own.
        corners = mesh.faces.reshape(-1)  # (3F,)
        return {
            "position": mesh.vertices[corners].astype(np.float32),
            "normal": np.repeat(mesh.face_normals, 3, axis=0).astype(np.float32),
            "color": np.repeat(colors, 3, axis=0),
        }
    if where == "none":
        colors = np.broadcast_to(GREY, (len(mesh.vertices), 3))
    return {
        "position": mesh.vertices.astype(np.float32),
        "normal": mesh.vertex_normals.astype(np.float32),
        "color": np.ascontiguousarray(colors, dtype=np.float32),
        "index": mesh.faces.reshape(-1).astype(np.uint32),
    }


def framing_camera(
    centre: np.ndarray, radius: float, azimuth_deg: float, elevation_deg: float, aspect: float
) -> np.ndarray:
    """Camera-to-world (4, 4) looking at `centre` from far enough that the sphere of `radius`
    fits in both the vertical and the horizontal field of view (FOVY_DEG)."""
    half_fovy = math.radians(FOVY_DEG) / 2
    half_fov = min(half_fovy, math.atan(math.tan(half_fovy) * aspect))
    distance = 1.05 * max(radius, 1e-6) / math.sin(half_fov)
    offset = orbit_positions(torch.tensor([azimuth_deg]), torch.tensor([elevation_deg]), distance)
    target = torch.as_tensor(centre, dtype=torch.float32)
    return look_at(offset + target, target=target)[0].double().numpy()


def bounding_sphere(meshes: list[trimesh.Trimesh]) -> tuple[np.ndarray, float]:
    """Centre (3,) of the box around every non-empty mesh and the radius reaching their
    farthest vertex: side-by-side views share one frame, so sizes compare directly."""
    meshes = [m for m in meshes if len(m.faces)]
    if not meshes:
        return np.zeros(3), 1.0
    low = np.min([m.bounds[0] for m in meshes], axis=0)
    high = np.max([m.bounds[1] for m in meshes], axis=0)
    centre = (low + high) / 2
    radius = max(float(np.linalg.norm(m.vertices - centre, axis=1).max()) for m in meshes)
    return centre, radius


@dataclass
class MeshViewer:
    """An interactive view of one mesh; `widget` is what gets displayed."""

    widget: object  # ipywidgets.VBox: title, renderer, wireframe toggle + size label
    renderer: object  # pythreejs.Renderer
    camera: object  # pythreejs.PerspectiveCamera, shared between linked viewers
    controls: object  # pythreejs.OrbitControls driving the camera, shared like it
    geometry: object  # pythreejs.BufferGeometry
    material: object  # pythreejs.MeshLambertMaterial
    wireframe_toggle: object  # ipywidgets.ToggleButton driving material.wireframe

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


def orbit_camera(frame: tuple[np.ndarray, float], width: int, height: int):
    """A pythreejs camera framing the sphere `frame` = (centre, radius) from WIDGET_VIEW, z up,
    and OrbitControls turning it around the centre. -> (camera, controls)"""
    import pythreejs as three
    from scipy.spatial.transform import Rotation

    centre, radius = frame
    c2w = framing_camera(centre, radius, *WIDGET_VIEW, width / height)
    distance = float(np.linalg.norm(c2w[:3, 3] - centre))
    camera = three.PerspectiveCamera(
        fov=FOVY_DEG,
        aspect=width / height,
        near=distance / 100,
        far=distance * 100,
        position=tuple(c2w[:3, 3]),
        quaternion=tuple(Rotation.from_matrix(c2w[:3, :3]).as_quat()),  # (x, y, z, w) as three
        up=(0.0, 0.0, 1.0),  # z up, TripoSR's world
    )
    return camera, three.OrbitControls(controlling=camera, target=tuple(centre))


def mesh_widget(
    mesh: trimesh.Trimesh,
    width: int = 480,
    height: int = 360,
    title: str | None = None,
    frame: tuple[np.ndarray, float] | None = None,
    camera_and_controls: tuple | None = None,
) -> MeshViewer:
    """A pythreejs view of a non-empty mesh, framed to the sphere `frame` = (centre, radius),
    by default the mesh's own `bounding_sphere`. Pass another viewer's (camera, controls) to
    link the two: orbiting either moves both, live."""
    import ipywidgets as widgets
    import pythreejs as three

    if len(mesh.faces) == 0:
        raise ValueError("mesh_widget: the mesh has no faces; show_mesh prints a message instead")
    arrays = geometry_arrays(mesh)
    with warnings.catch_warnings():
        # pythreejs tries a float64 array trait before the one that keeps our dtype and warns
        # about the discarded copy; the attribute keeps float32 / uint32 (tested).
        warnings.filterwarnings("ignore", message="Given trait value dtype", category=UserWarning)
        attributes = {
            name: three.BufferAttribute(a, normalized=False) for name, a in arrays.items()
        }
    geometry = three.BufferGeometry(attributes=attributes)
    # Lambert: matte like the static picture's shading, no highlights to misread as shape.
    material = three.MeshLambertMaterial(vertexColors="VertexColors", side="DoubleSide")
    if camera_and_controls is None:
        frame = bounding_sphere([mesh]) if frame is None else frame
        camera_and_controls = orbit_camera(frame, width, height)
    camera, controls = camera_and_controls
    lights = [three.AmbientLight(intensity=AMBIENT)] + [
        three.DirectionalLight(color="white", intensity=intensity, position=direction)
        for direction, intensity in (KEY_LIGHT, FILL_LIGHT)
    ]
    scene = three.Scene(children=[three.Mesh(geometry, material), *lights], background="white")
    renderer = three.Renderer(
        camera=camera, scene=scene, controls=[controls], width=width, height=height, antialias=True
    )
    toggle = widgets.ToggleButton(value=False, description="wireframe", icon="cube")
    widgets.dlink((toggle, "value"), (material, "wireframe"))
    size = widgets.HTML(f"{len(mesh.vertices):,} vertices · {len(mesh.faces):,} faces")
    parts = [widgets.HTML(f"<b>{title}</b>")] if title else []
    # A fixed-width column: in an HBox, flex would otherwise squeeze it below the canvas
    # width and the canvases of side-by-side views would overlap.
    column = widgets.Layout(width=f"{width}px", flex="0 0 auto", margin="0 12px 0 0")
    box = widgets.VBox([*parts, renderer, widgets.HBox([toggle, size])], layout=column)
    return MeshViewer(box, renderer, camera, controls, geometry, material, toggle)


def coarsened(mesh: trimesh.Trimesh, cells: int = STATIC_GRID_CELLS) -> trimesh.Trimesh:
    """Vertex clustering: vertices in one grid cell merge into the first of them, faces that
    collapse vanish, colours follow. For pictures only; the result need not be manifold."""
    cell = max(float(mesh.extents.max()), 1e-9) / cells
    keys = np.floor((mesh.vertices - mesh.bounds[0]) / cell).astype(np.int64)  # (V, 3)
    _, first, cluster = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    faces = cluster.reshape(-1)[mesh.faces]  # (F, 3) in cluster ids
    # Drop collapsed faces and slivers: their normals are noise and would shade as dark specks.
    corners = mesh.vertices[first][faces]  # (F, 3, 3)
    edges = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])  # (F, 3)
    keep = np.linalg.norm(edges, axis=1) > 0.05 * cell**2  # twice the area, vs a cell's
    coarse = trimesh.Trimesh(mesh.vertices[first], faces[keep], process=False)
    colors, where = mesh_colors(mesh)
    if where == "vertex":
        coarse.visual.vertex_colors = np.round(colors[first] * 255).astype(np.uint8)
    elif where == "face":
        coarse.visual.face_colors = np.round(colors[keep] * 255).astype(np.uint8)
    return coarse


def _outward_sign(mesh: trimesh.Trimesh) -> float | None:
    """+1 / -1 when back faces may be skipped (closed mesh, normals out / in), else None.
    Skipping them halves the drawing time and keeps big far faces from painting over near
    ones, which sorting by face centre alone gets wrong (a box's sides over its top)."""
    if not mesh.is_watertight:
        return None
    return 1.0 if mesh.volume > 0 else -1.0


def _draw_mesh(ax, mesh: trimesh.Trimesh, c2w: np.ndarray) -> None:
    """Painter's algorithm: project the faces, shade them, draw far ones first."""
    rotation, origin = c2w[:3, :3], c2w[:3, 3]
    faces, normals, colors = mesh.faces, mesh.face_normals, face_colors(mesh)
    outward = _outward_sign(mesh)
    if outward is not None:
        visible = outward * np.einsum("fc,fc->f", normals, origin - mesh.triangles_center) > 0
        faces, normals, colors = faces[visible], normals[visible], colors[visible]
    points_cam = (mesh.vertices - origin) @ rotation  # (V, 3), camera looks down -z
    depth = np.maximum(-points_cam[:, 2], 1e-6)  # (V,)
    screen = points_cam[:, :2] / depth[:, None]  # (V, 2), tangent units, y up
    order = np.argsort(-depth[faces].mean(axis=1))  # far to near
    light = rotation @ HEADLIGHT_CAM
    lambert = np.abs(normals @ light)  # two-sided: open or flipped meshes are still lit
    rgb = np.clip(colors * (AMBIENT + (1 - AMBIENT) * lambert)[:, None], 0, 1)[order]
    # Edges in the face colour close the hairline gaps Agg leaves between triangles.
    polygons = PolyCollection(screen[faces[order]], facecolors=rgb, edgecolors=rgb, linewidths=0.6)
    ax.add_collection(polygons)
    limit = math.tan(math.radians(FOVY_DEG) / 2)
    ax.set(xlim=(-limit, limit), ylim=(-limit, limit), aspect="equal")


def static_mesh_figure(
    meshes: dict[str, trimesh.Trimesh],
    views: tuple[tuple[float, float], ...] = STATIC_VIEWS,
    panel_inches: float = 2.0,
) -> Figure:
    """Rows of meshes, columns of (azimuth, elevation) views, all framed to one sphere."""
    centre, radius = bounding_sphere(list(meshes.values()))
    fig = Figure(figsize=(panel_inches * len(views), panel_inches * len(meshes)))
    axes = fig.subplots(len(meshes), len(views), squeeze=False)
    fig.subplots_adjust(left=0.06, right=1, bottom=0, top=0.9, wspace=0, hspace=0.1)
    for row, (name, mesh) in enumerate(meshes.items()):
        for col, (azimuth, elevation) in enumerate(views):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if len(mesh.faces):
                if len(mesh.faces) > STATIC_MAX_FACES:
                    mesh = coarsened(mesh)
                c2w = framing_camera(centre, radius, azimuth, elevation, 1.0)
                _draw_mesh(ax, mesh, c2w)
            else:
                ax.text(0.5, 0.5, "empty mesh", ha="center", va="center", transform=ax.transAxes)
            if row == 0:
                ax.set_title(f"az {azimuth:.0f}°, el {elevation:.0f}°", fontsize="small")
            if col == 0:
                ax.set_ylabel(name)
    return fig


def _display_static(meshes: dict[str, trimesh.Trimesh]) -> None:
    from IPython.display import Image, display

    display(Image(data=figure_png(static_mesh_figure(meshes))))


def _empty_message(name: str) -> str:
    return (
        f"{name}: empty mesh (0 faces), nothing to show. Marching cubes found no surface: "
        "try a lower threshold, or check that the model produced density."
    )


def show_mesh(
    mesh: trimesh.Trimesh | str | Path,
    width: int = 480,
    height: int = 360,
    title: str | None = None,
    mode: str | None = None,
) -> MeshViewer | None:
    """Display one mesh (see the module docstring for `mode`); returns the widget's parts,
    or None when only the static picture was drawn or the mesh is empty."""
    mesh = as_trimesh(mesh)
    mode = resolve_display_mode(mode)
    if len(mesh.faces) == 0:
        print(_empty_message(title or "mesh"))
        return None
    viewer = None
    if mode in ("both", "widget"):
        from IPython.display import display

        viewer = mesh_widget(mesh, width=width, height=height, title=title)
        display(viewer.widget)
    if mode in ("both", "static"):
        _display_static({title or "mesh": mesh})
    return viewer


def meshes_side_by_side_widget(
    meshes: dict[str, trimesh.Trimesh], width: int = 360, height: int = 360, link_cameras=True
):
    """An HBox of one viewer per mesh, framed to a shared sphere so sizes compare; with
    `link_cameras` all share one camera and its controls, so orbiting one view turns all.
    Returns (hbox, {name: MeshViewer, or None for an empty mesh})."""
    import ipywidgets as widgets

    frame = bounding_sphere(list(meshes.values()))
    shared = orbit_camera(frame, width, height) if link_cameras else None
    viewers, columns = {}, []
    for name, mesh in meshes.items():
        if len(mesh.faces) == 0:
            viewers[name] = None
            column = widgets.Layout(width=f"{width}px", flex="0 0 auto")
            columns.append(widgets.HTML(f"<b>{name}</b><br>{_empty_message(name)}", layout=column))
            continue
        viewers[name] = mesh_widget(mesh, width, height, name, frame, camera_and_controls=shared)
        columns.append(viewers[name].widget)
    return widgets.HBox(columns), viewers


def show_meshes_side_by_side(
    meshes: dict[str, trimesh.Trimesh | str | Path],
    width: int = 360,
    height: int = 360,
    link_cameras: bool = True,
    mode: str | None = None,
):
    """Display meshes next to each other, e.g. {"base": m1, "LoRA": m2}; the static picture
    puts them in rows. Returns {name: MeshViewer or None}, empty without widgets."""
    meshes = {name: as_trimesh(mesh) for name, mesh in meshes.items()}
    mode = resolve_display_mode(mode)
    viewers = {}
    if mode in ("both", "widget"):
        from IPython.display import display

        box, viewers = meshes_side_by_side_widget(meshes, width, height, link_cameras)
        display(box)
    if mode in ("both", "static"):
        _display_static(meshes)
    return viewers
