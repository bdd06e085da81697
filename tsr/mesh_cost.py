"""What a mesh extraction will cost in time and memory, said before a long or large one starts
(tsr.mesh.extract_isosurface warns with this estimate)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import psutil
import torch

# An extraction expected to run longer than this, or to need more than this share of the
# free memory, says so first, with its estimate.
WARN_ABOVE_SECONDS = 60.0
WARN_ABOVE_MEMORY_SHARE = 0.5
# Marching cubes per grid cell with the torch backend on 2 CPU cores (0.6 s at 256^3 on a
# busy machine; PyMCubes 1.0 s). Used on a GPU too, where it overestimates.
MARCHING_SECONDS_PER_CELL = 4e-8
# Bytes per grid point of a volume being meshed: the float32 level, and marching cubes'
# packed case bits and mask.
BYTES_PER_VOLUME_POINT = 8
# Bytes per R^2 of a finished mesh: a closed surface about the size of the box's inscribed
# ball has ~2 R^2 vertices (float64 xyz) and ~4 R^2 faces (int64), 150 B per R^2.
MESH_BYTES_PER_R2 = 150


@dataclass
class Estimate:
    """What an extraction will cost, said before a long or large one starts."""

    resolution: int
    method: str
    n_blocks: int
    block_cells: int
    coarse_step: int
    device: torch.device

    @property
    def memory_bytes(self) -> int:
        """Peak memory, less density_fn's own working memory: one volume being meshed, the
        coarse grids of the band methods, and the finished mesh."""
        volume = (self.block_cells + 1) ** 3 * BYTES_PER_VOLUME_POINT
        coarse = 0
        if self.method in ("band", "coarse_to_fine", "certified"):
            # values (float32) + masks; "certified" also keeps its parent level and signs
            per_point = 16 if self.method == "certified" else 8
            coarse = ((self.resolution - 1) // self.coarse_step + 2) ** 3 * per_point
        return volume + coarse + MESH_BYTES_PER_R2 * self.resolution**2

    def free_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0]
        return psutil.virtual_memory().available

    def warn_if_short_of_memory(self) -> None:
        if self.memory_bytes > WARN_ABOVE_MEMORY_SHARE * self.free_bytes():
            warnings.warn(self._message(), stacklevel=3)

    def warn_if_slow(self, n_queries: int, seconds_per_query: float) -> None:
        marching = self.n_blocks * self.block_cells**3 * MARCHING_SECONDS_PER_CELL
        seconds = n_queries * seconds_per_query + marching
        if seconds > WARN_ABOVE_SECONDS:
            queries = (
                f"about {n_queries:,} density queries at {seconds_per_query * 1e6:.3g} us each "
                f"(as measured so far) = {duration(n_queries * seconds_per_query)}, marching cubes "
                f"about {duration(marching)}: about {duration(seconds)} in all; "
            )
            warnings.warn(self._message(queries), stacklevel=4)

    def _message(self, time_part: str = "") -> str:
        tiling = "one volume" if self.n_blocks == 1 else f"{self.n_blocks:,} blocks"
        return (
            f"mesh extraction on a {self.resolution}^3 grid ({self.method}, {tiling}): "
            f"{time_part}peak memory about {self.memory_bytes / 2**30:.2f} GiB of "
            f"{self.free_bytes() / 2**30:.1f} GiB free on {self.device.type}. A lower "
            "resolution costs 8x less per halving; method 'blocks' bounds the memory."
        )


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
