"""Image preprocessing: what happens to a picture before the model sees it.

`prepare_images` is what `TSR.forward` does to its input; `resize_foreground` and
`remove_background` are the optional steps TripoSR's run.py applies before that.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ImageLike = Image.Image | np.ndarray | torch.Tensor


def composite_on_grey(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) float in [0, 1] -> (H, W, 3): rgb * a + 0.5 * (1 - a), TripoSR's background."""
    rgb, alpha = rgba[..., :3], rgba[..., 3:4]
    return rgb * alpha + 0.5 * (1 - alpha)


def image_to_float(image: ImageLike) -> torch.Tensor:
    """One image -> (H, W, 3) float32 tensor; uint8 is divided by 255, floats pass through."""
    if isinstance(image, Image.Image):
        if image.mode == "RGBA":
            return torch.from_numpy(
                composite_on_grey(np.asarray(image, dtype=np.float32) / 255.0).astype(np.float32)
            )
        image = np.asarray(image.convert("RGB"))
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
    """Open an image file, naming it if it cannot be read."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error


def has_transparency(image: Image.Image) -> bool:
    return image.mode == "RGBA" and np.asarray(image)[..., 3].min() < 255


def resize_foreground(image: Image.Image, ratio: float) -> Image.Image:
    """Crop an RGBA image to its alpha bounding box, pad to a square whose side is the box's
    longer side / ratio, object centred. -> RGBA of that size."""
    if image.mode != "RGBA":
        raise ValueError("resize_foreground needs an RGBA image (remove the background first)")
    if not 0 < ratio <= 1:
        raise ValueError(f"foreground ratio must be in (0, 1], got {ratio}")
    rgba = np.asarray(image)
    rows, cols = np.nonzero(rgba[..., 3] > 0)
    if rows.size == 0:
        raise ValueError("the image's alpha is empty: there is no foreground to frame")
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
        raise RuntimeError(
            "background removal needs rembg: `pip install -e '.[rembg]'`, or pass an RGBA image "
            "with transparency, or use --no-remove-bg"
        ) from error
    try:
        return rembg.remove(image, session=session or rembg.new_session()).convert("RGBA")
    except Exception as error:  # rembg downloads its model on first use; offline it fails
        raise RuntimeError(
            f"rembg could not run ({error}); it fetches its u2net model on first use. Offline, "
            "use --no-remove-bg or give an RGBA image with the background already removed"
        ) from error
