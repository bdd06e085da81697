"""Our TripoSR: single image -> triplane NeRF -> mesh, loading the official checkpoint."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

# Idle OpenMP threads sleep instead of spinning, unless the user chose otherwise. On a shared
# 2-core machine spinning threads fight the other work for the cores: `python -m tsr` at
# 256^3 on the full-size model took 232 s spinning, 53 s sleeping (load average 3.4). It only
# takes effect before torch loads its OpenMP runtime: the CLIs import tsr before torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
