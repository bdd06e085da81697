"""The mesh viewer: the pythreejs scene it builds and the static picture it falls back to."""

import io
import math

import matplotlib
import numpy as np
import pytest
import trimesh
from PIL import Image

matplotlib.use("Agg")

pytest.importorskip("pythreejs")
from utils.figures import figure_png
from utils.notebook import mesh_figures, viewer


def coloured_sphere() -> trimesh.Trimesh:
    """An icosphere off the origin whose vertex colours encode position, uint8 RGBA."""
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    sphere.apply_translation([0.2, -0.1, 0.3])
    rgb = (sphere.vertices - sphere.vertices.min(0)) / np.ptp(sphere.vertices, axis=0)
    sphere.visual.vertex_colors = np.c_[rgb * 255, np.full(len(rgb), 255)].astype(np.uint8)
    return sphere


def red_box() -> trimesh.Trimesh:
    box = trimesh.creation.box(extents=(0.6, 0.4, 0.8))
    box.visual.face_colors = np.tile([220, 20, 20, 255], (len(box.faces), 1)).astype(np.uint8)
    return box


def png_pixels(fig) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(figure_png(fig))).convert("RGB")).astype(int)


def test_vertex_coloured_geometry_keeps_vertices_and_scales_colours():
    sphere = coloured_sphere()
    attributes = viewer.mesh_widget(sphere).geometry.attributes
    assert attributes["position"].array.shape == (len(sphere.vertices), 3)
    assert attributes["normal"].array.shape == (len(sphere.vertices), 3)
    colours = attributes["color"].array
    assert colours.shape == (len(sphere.vertices), 3)
    assert colours.min() >= 0.0 and colours.max() <= 1.0 and colours.max() > 0.9
    np.testing.assert_allclose(colours, sphere.visual.vertex_colors[:, :3] / 255.0, atol=1e-6)
    index = attributes["index"].array
    assert index.dtype == np.uint32 and index.shape == (3 * len(sphere.faces),)


def test_face_colours_get_their_own_vertices():
    box = red_box()
    arrays = viewer.geometry_arrays(box)
    assert "index" not in arrays
    assert arrays["position"].shape == (3 * len(box.faces), 3)
    np.testing.assert_allclose(arrays["color"], np.tile([220 / 255, 20 / 255, 20 / 255], (36, 1)))


def test_uncoloured_mesh_is_grey():
    colours = viewer.geometry_arrays(trimesh.creation.icosphere(subdivisions=1))["color"]
    assert np.allclose(colours, mesh_figures.GREY)


@pytest.mark.parametrize(("width", "height"), [(480, 360), (300, 500)])
def test_camera_has_the_widget_aspect_and_frames_the_mesh(width, height):
    sphere = coloured_sphere()
    parts = viewer.mesh_widget(sphere, width=width, height=height)
    camera = parts.camera
    assert camera.aspect == pytest.approx(width / height)
    assert (parts.renderer.width, parts.renderer.height) == (width, height)
    assert tuple(camera.up) == (0.0, 0.0, 1.0)
    # The camera looks down its own -z: that axis, rotated by the quaternion, must point at
    # the mesh centre, which is also the orbit target.
    from scipy.spatial.transform import Rotation

    forward = Rotation.from_quat(camera.quaternion).apply([0.0, 0.0, -1.0])
    centre, radius = mesh_figures.bounding_sphere([sphere])
    to_centre = centre - np.asarray(camera.position)
    distance = np.linalg.norm(to_centre)
    np.testing.assert_allclose(forward, to_centre / distance, atol=1e-5)
    np.testing.assert_allclose(parts.renderer.controls[0].target, centre, atol=1e-6)
    # The bounding sphere fits the narrower of the two fields of view.
    half_fovy = math.radians(camera.fov) / 2
    half_fov = min(half_fovy, math.atan(math.tan(half_fovy) * width / height))
    assert distance * math.sin(half_fov) >= radius
    assert camera.near < distance - radius and camera.far > distance + radius


def test_scene_has_ambient_and_directional_lights_and_orbit_controls():
    import pythreejs as three

    parts = viewer.mesh_widget(coloured_sphere())
    kinds = [type(child) for child in parts.renderer.scene.children]
    assert kinds.count(three.AmbientLight) == 1 and kinds.count(three.DirectionalLight) == 2
    assert kinds.count(three.Mesh) == 1
    assert parts.renderer.controls == [parts.controls]
    assert isinstance(parts.controls, three.OrbitControls)
    assert parts.controls.controlling is parts.camera


def test_wireframe_toggle_flips_the_material():
    parts = viewer.mesh_widget(coloured_sphere())
    assert parts.material.wireframe is False
    parts.wireframe_toggle.value = True
    assert parts.material.wireframe is True
    parts.wireframe_toggle.value = False
    assert parts.material.wireframe is False


def test_side_by_side_shares_one_frame_and_shows_empty_meshes_as_text():
    meshes = {"base": coloured_sphere(), "LoRA": red_box(), "broken": trimesh.Trimesh()}
    box, parts = viewer.meshes_side_by_side_widget(meshes)
    assert len(box.children) == 3
    assert parts["broken"] is None
    assert "empty mesh" in box.children[2].value
    # Linked: one camera and one set of controls, so orbiting either view turns both.
    assert parts["base"].camera is parts["LoRA"].camera
    assert parts["base"].controls is parts["LoRA"].controls
    assert parts["base"].renderer.scene is not parts["LoRA"].renderer.scene
    _, independent = viewer.meshes_side_by_side_widget(meshes, link_cameras=False)
    assert independent["base"].camera is not independent["LoRA"].camera
    np.testing.assert_allclose(independent["base"].camera.position, parts["LoRA"].camera.position)


def test_empty_mesh_prints_a_message_instead_of_crashing(capsys):
    assert viewer.show_mesh(trimesh.Trimesh(), title="LoRA", mode="both") is None
    assert "LoRA: empty mesh" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no faces"):
        viewer.mesh_widget(trimesh.Trimesh())


def test_static_picture_shows_the_mesh_in_its_colour():
    pixels = png_pixels(mesh_figures.static_mesh_figure({"box": red_box()}))
    drawn = (pixels < 245).any(axis=-1)
    assert drawn.mean() > 0.05  # not blank
    red, green, blue = pixels[drawn].T
    assert np.mean((red > green + 30) & (red > blue + 30)) > 0.8  # shaded red, not grey


def test_static_picture_culls_back_faces_of_closed_meshes_only():
    assert mesh_figures._outward_sign(red_box()) == 1.0
    inside_out = red_box()
    inside_out.invert()
    assert mesh_figures._outward_sign(inside_out) == -1.0
    open_box = red_box()
    open_box.update_faces(np.arange(len(open_box.faces)) > 1)  # drop one side
    assert mesh_figures._outward_sign(open_box) is None


def test_big_meshes_are_coarsened_for_the_picture_and_keep_their_colours():
    sphere = trimesh.creation.icosphere(subdivisions=6)  # 81,920 faces
    sphere.visual.vertex_colors = np.tile([10, 200, 30, 255], (len(sphere.vertices), 1))
    coarse = mesh_figures.coarsened(sphere, cells=32)
    assert 1_000 < len(coarse.faces) < len(sphere.faces) // 4
    assert np.all(coarse.visual.vertex_colors == [10, 200, 30, 255])
    # Still a sphere of the same size: every kept vertex is an original one.
    np.testing.assert_allclose(np.linalg.norm(coarse.vertices, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(coarse.bounds, sphere.bounds, atol=0.1)


def test_static_picture_of_empty_and_full_meshes_together():
    fig = mesh_figures.static_mesh_figure({"base": coloured_sphere(), "empty": trimesh.Trimesh()})
    assert len(fig.axes) == 2 * len(mesh_figures.STATIC_VIEWS)
    assert png_pixels(fig).std() > 10


def test_display_mode_follows_argument_and_environment(monkeypatch):
    monkeypatch.delenv("WORKBOOK_STATIC_VIEWER", raising=False)
    assert viewer.resolve_display_mode() == "both"
    assert viewer.resolve_display_mode("widget") == "widget"
    monkeypatch.setenv("WORKBOOK_STATIC_VIEWER", "1")
    assert viewer.resolve_display_mode() == "static"
    with pytest.raises(ValueError, match="unknown"):
        viewer.resolve_display_mode("3d")


def test_static_mode_displays_a_png_and_no_widget(monkeypatch):
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj, **kw: shown.append(obj))
    assert viewer.show_mesh(red_box(), mode="static") is None
    assert len(shown) == 1 and shown[0].data.startswith(b"\x89PNG")
    shown.clear()
    parts = viewer.show_meshes_side_by_side({"a": red_box(), "b": coloured_sphere()}, mode="both")
    assert set(parts) == {"a", "b"} and len(shown) == 2  # the HBox, then the PNG


def test_mesh_files_load_and_bad_inputs_say_what_is_wrong(tmp_path):
    path = tmp_path / "box.ply"
    red_box().export(path)
    assert len(mesh_figures.as_trimesh(path).faces) == 12
    with pytest.raises(FileNotFoundError, match=r"missing\.obj"):
        mesh_figures.as_trimesh(tmp_path / "missing.obj")
    with pytest.raises(TypeError, match="ndarray"):
        mesh_figures.as_trimesh(np.zeros((3, 3)))


@pytest.mark.parametrize("mode", ["both", "static"])
def test_the_static_strip_says_what_it_is_without_live_widget_instructions(monkeypatch, mode):
    """Read in an HTML export, a strip captioned "drag to orbit" or "the extension failed"
    says something false: its caption must hold wherever it is read."""
    captions = []
    real = viewer.static_mesh_figure

    def recording(meshes, caption=None, **kwargs):
        captions.append(caption)
        return real(meshes, caption=caption, **kwargs)

    monkeypatch.setattr(viewer, "static_mesh_figure", recording)
    monkeypatch.setattr("IPython.display.display", lambda obj, **kw: None)
    viewer.show_mesh(red_box(), title="a red box", mode=mode)
    assert captions == [viewer.STATIC_CAPTIONS[mode]]
    for word in ("drag", "scroll", "zoom", "click", "fail", "did not load"):
        assert word not in captions[0]
    figure = real({"box": red_box()}, caption=captions[0])
    assert [text.get_text() for text in figure.texts] == [captions[0]]
