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
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import trimesh

from utils.figures import figure_png
from utils.notebook.mesh_figures import (
    AMBIENT,
    FOVY_DEG,
    GREY,
    as_trimesh,
    bounding_sphere,
    framing_camera,
    mesh_colors,
    static_mesh_figure,
)

DISPLAY_MODES = ("both", "widget", "static")
WIDGET_VIEW = (30.0, 20.0)  # (azimuth, elevation) in degrees of the widget's first view
# Widget lights are fixed in the world (up is +z), not riding on the camera: linked views
# share one camera, and a three.js camera with a light attached can live in one scene only.
# A key light from above-front and a weaker fill from behind give every side its own shade.
KEY_LIGHT = ((1.0, 0.6, 1.4), 0.55)  # (direction towards the light, intensity)
FILL_LIGHT = ((-1.0, -0.8, 0.2), 0.25)


def resolve_display_mode(mode: str | None = None) -> str:
    """'both' | 'widget' | 'static', falling back to 'static' without a widget toolkit."""
    if mode is None:
        mode = "static" if os.environ.get("WORKBOOK_STATIC_VIEWER") == "1" else "both"
    if mode not in DISPLAY_MODES:
        raise ValueError(f"display mode {mode!r} unknown: use one of {DISPLAY_MODES}")
    toolkit = all(importlib.util.find_spec(name) for name in ("pythreejs", "ipywidgets"))
    return mode if toolkit else "static"


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


# Under the static strip: what it is, in words true wherever it is read (a live JupyterLab, a
# saved copy, an HTML export), so no orbit or zoom instruction; widget captions say those.
STATIC_CAPTIONS = {
    "both": "still views of the same mesh, which saved and exported copies of the notebook keep",
    "static": "still views at fixed angles; the orbitable 3D view needs a running kernel "
    "with pythreejs (notebook 00 checks)",
}


def static_picture(meshes: dict[str, trimesh.Trimesh], mode: str):
    """The static strip of `meshes` with the caption for display `mode`, as an IPython Image."""
    from IPython.display import Image

    figure = static_mesh_figure(meshes, caption=STATIC_CAPTIONS[mode])
    return Image(data=figure_png(figure))


def _display_static(meshes: dict[str, trimesh.Trimesh], mode: str) -> None:
    from IPython.display import display

    display(static_picture(meshes, mode))


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
        _display_static({title or "mesh": mesh}, mode)
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
        _display_static(meshes, mode)
    return viewers
