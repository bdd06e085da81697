"""Your own photo -> the model's input (notebook 04): transparency, rembg, or a clear notice."""

import numpy as np
import pytest
from PIL import Image

from utils.notebook import photos


def write_rgba(path, box=(20, 10, 30, 50)):
    """A 64 x 64 PNG, transparent but for an opaque red box (top, left, height, width)."""
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    top, left, height, width = box
    rgba[top : top + height, left : left + width] = [200, 30, 30, 255]
    Image.fromarray(rgba, mode="RGBA").save(path)
    return path


@pytest.fixture
def without_rembg(monkeypatch):
    real = photos.importlib.util.find_spec
    monkeypatch.setattr(
        photos.importlib.util, "find_spec", lambda name: None if name == "rembg" else real(name)
    )


@pytest.fixture
def with_rembg(monkeypatch):
    """rembg 'installed': its cut-out keeps the pixels that are not white."""
    real = photos.importlib.util.find_spec
    monkeypatch.setattr(
        photos.importlib.util, "find_spec", lambda name: object() if name == "rembg" else real(name)
    )

    def cut_out(image):
        rgb = np.asarray(image)
        alpha = np.where((rgb < 250).any(axis=-1), 255, 0).astype(np.uint8)
        return Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA")

    monkeypatch.setattr(photos, "remove_background", cut_out)


def alpha_box_fraction(image: Image.Image) -> float:
    """The opaque box's longer side over the picture's side."""
    rows, cols = np.nonzero(np.asarray(image)[..., 3] > 0)
    return max(np.ptp(rows) + 1, np.ptp(cols) + 1) / image.size[0]


def test_an_rgba_image_is_framed_by_its_transparency(tmp_path, without_rembg):
    image, note = photos.prepare_photo(write_rgba(tmp_path / "object.png"), 0.85)
    assert image.mode == "RGBA"
    # The 50-pixel box fills 85 % of a square side int(50 / 0.85) = 58 (a hand computation).
    assert image.size == (58, 58) and alpha_box_fraction(image) == pytest.approx(50 / 58)
    assert "transparency marks the object" in note and "pip install -e '.[rembg]'" in note


def test_a_plain_photo_without_rembg_goes_in_as_it_is_with_a_notice(tmp_path, without_rembg):
    pixels = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.jpg", quality=100)
    image, note = photos.prepare_photo(tmp_path / "photo.jpg")
    assert image.mode == "RGB" and image.size == (60, 40)  # untouched
    assert "rembg is not installed" in note and "background included" in note


def test_a_plain_photo_with_rembg_is_cut_out_and_framed(tmp_path, with_rembg):
    rgb = np.full((64, 64, 3), 255, dtype=np.uint8)
    rgb[10:50, 20:30] = [30, 30, 200]  # a 40 x 10 blue bar on white
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    image, note = photos.prepare_photo(tmp_path / "photo.png", 0.5)
    assert image.mode == "RGBA" and alpha_box_fraction(image) == pytest.approx(0.5)
    assert "background removed with rembg" in note


def test_rembg_failing_offline_falls_back_with_its_reason(tmp_path, with_rembg, monkeypatch):
    def offline(image):
        raise RuntimeError("rembg could not run (no network)")

    monkeypatch.setattr(photos, "remove_background", offline)
    Image.new("RGB", (32, 32), "white").save(tmp_path / "photo.png")
    image, note = photos.prepare_photo(tmp_path / "photo.png")
    assert image.mode == "RGB" and "no network" in note and "background included" in note


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"nope\.png"):
        photos.prepare_photo(tmp_path / "nope.png")
