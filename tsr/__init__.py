"""Our TripoSR: single image -> triplane NeRF -> mesh, loading the official checkpoint."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .model import TSR
    from .preprocess import remove_background, resize_foreground

__all__ = ["TSR", "remove_background", "resize_foreground"]


def __getattr__(name: str):
    # Lazy, so `tsr.cameras` (used by the data tools) does not pay for importing transformers.
    if name == "TSR":
        from .model import TSR

        return TSR
    if name in ("remove_background", "resize_foreground"):
        from . import preprocess

        return getattr(preprocess, name)
    raise AttributeError(f"module 'tsr' has no attribute {name!r}")
