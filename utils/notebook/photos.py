"""Your own photo as the model's input, and a note of what was done to it.

The model was trained on objects cut out of their background and framed to fill 85 % of the
picture. A PNG with transparency already says where the object is; a plain photo needs its
background removed, which rembg (an optional extra) does. Without rembg the photo goes in as
it is, and the note says so: the background becomes part of the "object".
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from PIL import Image

from tsr.preprocess import has_transparency, load_image, remove_background, resize_foreground

REMBG_HINT = "pip install -e '.[rembg]' adds rembg, which cuts a photo's background away"


def prepare_photo(path: str | Path, foreground_ratio: float = 0.85) -> tuple[Image.Image, str]:
    """One image file -> (the image the model gets, RGBA framed or RGB as is; what was done)."""
    image = load_image(path)
    rembg_installed = importlib.util.find_spec("rembg") is not None
    if has_transparency(image):
        note = f"{path}: its transparency marks the object, no background removal needed"
        if not rembg_installed:
            note += f" (for photos without transparency: {REMBG_HINT})"
    elif not rembg_installed:
        note = (
            f"{path} has no transparency and rembg is not installed: the photo goes in as it "
            f"is, background included. {REMBG_HINT}, or give a PNG with a transparent background"
        )
        return image.convert("RGB"), note
    else:
        try:
            image = remove_background(image.convert("RGB"))
        except RuntimeError as error:  # rembg fetches its model on first use: offline it fails
            return image.convert("RGB"), f"{path}: used as it is, background included: {error}"
        note = f"{path}: background removed with rembg"
    framed = resize_foreground(image, foreground_ratio)
    return framed, f"{note}; the object re-framed to {foreground_ratio:.0%} of the picture"
