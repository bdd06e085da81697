"""Image preprocessing: what happens to a picture before the model sees it.

`prepare_images` is what `TSR.forward` does to its input; `resize_foreground` and
`remove_background` are the optional steps TripoSR's run.py applies before that.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .errors import UserInputError

ImageLike = Image.Image | np.ndarray | torch.Tensor
MIN_IMAGE_SIDE = 8  # pixels: a smaller image holds no recognisable picture of an object
SMALL_IMAGE_SIDE = 64  # pixels: below this the model sees a blur upscaled many times
# Pillow modes that convert to RGB as they are; those with alpha convert to RGBA
TO_RGB = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "HSV")
TO_RGBA = ("LA", "La", "PA", "RGBA", "RGBa")


def composite_on_grey(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) float in [0, 1] -> (H, W, 3): rgb * a + 0.5 * (1 - a), TripoSR's background."""
    rgb, alpha = rgba[..., :3], rgba[..., 3:4]
    return rgb * alpha + 0.5 * (1 - alpha)


def _grey_in_unit_range(image: Image.Image, source: str) -> np.ndarray:
    """16-bit, 32-bit integer and float greyscale -> (H, W) float32 in [0, 1], by the range
    of the format, not clipped to 8 bits (a 16-bit picture would turn into a white
    silhouette). Integers up to 65535 are 16-bit data, as Pillow opens 16-bit files."""
    values = np.asarray(image).astype(np.float64)
    if not np.isfinite(values).all():
        raise UserInputError(
            "a float image with NaN or inf pixels", source, "save it as an 8- or 16-bit PNG"
        )
    low, high = float(values.min()), float(values.max())
    if image.mode == "F":
        if low < 0 or high > 1:
            raise UserInputError(
                f"a float image with values in [{low:g}, {high:g}], which is not [0, 1]",
                source, "scale it to [0, 1], or save it as an 8- or 16-bit PNG",
            )  # fmt: skip
        return values.astype(np.float32)
    if low < 0:
        raise UserInputError(
            f"a {image.mode} image with negative pixels ({low:g})", source,
            "save it as an 8- or 16-bit PNG",
        )  # fmt: skip
    full_scale = 65535.0 if high <= 65535 else float(2**31 - 1)
    return (values / full_scale).astype(np.float32)


def to_rgb_or_rgba(image: Image.Image, source: str = "image") -> Image.Image:
    """Any Pillow mode -> RGB, or RGBA where it carries transparency (alpha, a palette's or
    a colour key): LA, PA and P with transparency keep it; 16-bit, 32-bit and float greyscale
    are scaled by their range; CMYK and the like are converted; other modes are refused by
    name. `source` names the image in errors."""
    mode = image.mode
    try:
        if mode in TO_RGBA or (mode in ("1", "L", "P", "RGB") and "transparency" in image.info):
            return image if mode == "RGBA" else image.convert("RGBA")
        if mode in TO_RGB:
            return image if mode == "RGB" else image.convert("RGB")
    except (ValueError, OSError) as error:
        raise UserInputError(
            f"an image of mode {mode} that cannot be converted ({error})", source,
            "save it as an RGB or RGBA PNG",
        ) from error  # fmt: skip
    if mode in ("I", "F") or mode.startswith("I;16"):
        grey = np.round(_grey_in_unit_range(image, source) * 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    raise UserInputError(
        f"an image of mode {mode}, which this tool does not read", source,
        "save it as an RGB or RGBA PNG",
    )  # fmt: skip


def image_to_float(image: ImageLike) -> torch.Tensor:
    """One image -> (H, W, 3) float32 tensor; uint8 is divided by 255, floats pass through."""
    if isinstance(image, Image.Image):
        image = to_rgb_or_rgba(image)
        if image.mode == "RGBA":
            return torch.from_numpy(
                composite_on_grey(np.asarray(image, dtype=np.float32) / 255.0).astype(np.float32)
            )
        image = np.asarray(image)
    if isinstance(image, np.ndarray):
        array = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    else:
        tensor = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    if tensor.ndim != 3 or tensor.shape[-1] not in (3, 4):
        raise ValueError(
            f"expected an HWC image with 3 or 4 channels, got shape {tuple(tensor.shape)}"
        )
    if tensor.shape[-1] == 4:
        tensor = composite_on_grey(tensor)
    return tensor


def resize_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """(H, W, 3) -> (size, size, 3), bilinear with antialiasing as TripoSR resizes."""
    resized = F.interpolate(
        image.permute(2, 0, 1)[None],
        (size, size),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )
    return resized[0].permute(1, 2, 0)


def prepare_images(images: ImageLike | Sequence[ImageLike], size: int) -> torch.Tensor:
    """One image or a list -> (B, size, size, 3) float32 in [0, 1]."""
    if isinstance(images, (Image.Image, np.ndarray)) or (
        isinstance(images, torch.Tensor) and images.ndim == 3
    ):
        images = [images]
    if isinstance(images, torch.Tensor):  # (B, H, W, 3) batch tensor
        images = list(images)
    return torch.stack([resize_square(image_to_float(image), size) for image in images])


def load_image(path: str | Path) -> Image.Image:
    """Open an image file upright (its EXIF orientation applied) as RGB, or RGBA when it
    carries transparency (`to_rgb_or_rgba`); errors name the file and say what to do."""
    if not Path(path).is_file():
        raise UserInputError("image not found", path, "check the path")
    try:
        with Image.open(path) as image:
            image.load()
            upright = ImageOps.exif_transpose(image)  # phones store portraits sideways
    except (OSError, ValueError, SyntaxError) as error:  # PIL raises all three for bad files
        raise UserInputError(
            f"not a readable image ({error})", path, "save it again as PNG or JPEG"
        ) from error
    width, height = upright.size
    if min(width, height) < MIN_IMAGE_SIDE:
        raise UserInputError(
            f"only {width}x{height} pixels, too small to hold a picture", path,
            f"use an image at least {MIN_IMAGE_SIDE} pixels a side (ideally 512)",
        )  # fmt: skip
    if min(width, height) < SMALL_IMAGE_SIDE:
        warnings.warn(
            f"{path}: only {width}x{height} pixels; the model sees it upscaled, as a blur",
            stacklevel=2,
        )
    return to_rgb_or_rgba(upright, str(path))


def has_transparency(image: Image.Image) -> bool:
    return image.mode == "RGBA" and np.asarray(image)[..., 3].min() < 255


def resize_foreground(image: Image.Image, ratio: float) -> Image.Image:
    """Crop an RGBA image to its alpha bounding box, pad to a square whose side is the box's
    longer side / ratio, object centred. -> RGBA of that size."""
    if image.mode != "RGBA":
        raise UserInputError(
            f"an image of mode {image.mode}, not RGBA", "image", "remove the background first"
        )
    if not 0 < ratio <= 1:
        raise UserInputError(f"got {ratio}, not in (0, 1]", "foreground ratio", "pass 0.85")
    rgba = np.asarray(image)
    rows, cols = np.nonzero(rgba[..., 3] > 0)
    if rows.size == 0:
        raise UserInputError(
            "fully transparent: there is no object to frame", "image",
            "give an image whose object is opaque, or one without alpha and let the "
            "background removal cut the object out",
        )  # fmt: skip
    crop = rgba[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    height, width = crop.shape[:2]
    side = max(height, width)
    square = np.zeros((side, side, 4), dtype=np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    square[top : top + height, left : left + width] = crop
    padded_side = int(side / ratio)
    pad = (padded_side - side) // 2
    framed = np.zeros((padded_side, padded_side, 4), dtype=np.uint8)
    framed[pad : pad + side, pad : pad + side] = square
    return Image.fromarray(framed, mode="RGBA")


def remove_background(image: Image.Image, session: object | None = None) -> Image.Image:
    """Cut the object out with rembg (optional extra). -> RGBA"""
    try:
        import rembg
    except ImportError as error:
        raise UserInputError(
            "background removal needs rembg, which is not installed", "image",
            "`pip install -e '.[rembg]'`, or pass an RGBA image with transparency, or use "
            "--no-remove-bg",
        ) from error  # fmt: skip
    try:
        return rembg.remove(image, session=session or rembg.new_session()).convert("RGBA")
    except Exception as error:  # rembg downloads its model on first use; offline it fails
        raise UserInputError(
            f"rembg could not run ({error}); it fetches its u2net model on first use", "image",
            "offline, use --no-remove-bg or give an RGBA image with the background removed",
        ) from error  # fmt: skip
