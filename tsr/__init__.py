"""Our TripoSR: single image -> triplane NeRF -> mesh, loading the official checkpoint."""

from .model import TSR
from .preprocess import remove_background, resize_foreground

__all__ = ["TSR", "remove_background", "resize_foreground"]
