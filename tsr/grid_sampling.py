"""Level volumes (`density - threshold`) of grid blocks: every point queried, or only some.

A sampler's `sample(query, axis, lo, hi)` returns the (X, Y, Z) level volume of the block of
grid points lo..hi (inclusive). The kinds:
  sample_dense: every point.
  CoarseToFine: a coarse grid, then every point of the cells where the coarse samples change
    sign (and `margin` cells around them). Blind to what passes between coarse samples.
    With `log_margin` ("band"), also the cells with a corner within a factor e^log_margin of
    the threshold: a positive density that rises to the threshold between samples is near it
    at them. A margin, not a proof: tsr.model measures the one it uses.
  Certified (tsr.certified_sampling): coarse grids, finer only where needed, and a Lipschitz
    bound on the density that proves the unqueried cells hold no surface.
Every decision is a function of the global coarse grid, so two blocks agree on the points
they share and their meshes weld.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

DensityFn = Callable[[torch.Tensor], torch.Tensor]  # (N, 3) world points -> (N,) density
# A band selecting more than this share of the coarse cells selects them all. Surfaces of
# trained models select 5-35 %; fields lumpy at the coarse scale, where a margin missed
# islands, 90 % and more (benchmarks/bench_band.py).
BAND_DENSE_ABOVE = 0.5


@dataclass
class GridQuery:
    """density_fn on grid points, written as `density - threshold` into level volumes."""

    density_fn: DensityFn
    threshold: float
    chunk_size: int
    bar: tqdm | None  # advanced once per chunk, when given
    seen: torch.Tensor  # (2,) min and max density queried so far, kept on the device
    n_queries: int = 0
    n_chunks: int = 0
    # Time and points of the chunks after the first (which pays one-off set-up costs: 2-3x
    # the later ones for the decoders here), to estimate the rest of a long extraction.
    warm_seconds: float = 0.0
    warm_points: int = 0
    # Called once, with seconds per point, after the next chunk that counts as warm.
    after_warm_chunk: Callable[[float], None] | None = field(default=None, repr=False)

    @property
    def seconds_per_point(self) -> float | None:
        return self.warm_seconds / self.warm_points if self.warm_points else None

    def __call__(self, axes, out: torch.Tensor, point_ids: torch.Tensor | None = None) -> None:
        """Fill out (X*Y*Z,), the flat level volume of the grid `axes[0] x axes[1] x axes[2]`
        (x slowest), at point_ids (flat indices; all points when None).
        """
        n_points = out.numel() if point_ids is None else point_ids.numel()
        step = self.chunk_size if self.chunk_size > 0 else max(n_points, 1)
        chunks = list(self._chunks(axes, step, point_ids))
        if self.bar is not None:
            self.bar.total = (self.bar.total or 0) + len(chunks)
        for target, make_points in chunks:
            warm = self.n_chunks > 0
            self.n_chunks += 1
            tick = time.perf_counter()
            points = make_points()  # (N, 3)
            density = self.density_fn(points)
            if density.numel() != len(points):
                raise ValueError(
                    f"density_fn returned shape {tuple(density.shape)} for {len(points)} points: "
                    "it must return one density per point, shaped (N,) or (N, 1)"
                )
            density = density.reshape(-1).float()
            out[target] = density - self.threshold  # in float32, as TripoSR
            low, high = torch.aminmax(density)
            self.seen[0], self.seen[1] = self.seen[0].minimum(low), self.seen[1].maximum(high)
            if warm:
                if points.is_cuda and self.after_warm_chunk is not None:
                    torch.cuda.synchronize(points.device)  # time the kernels, not their launch
                self.warm_seconds += time.perf_counter() - tick
                self.warm_points += len(points)
                if self.after_warm_chunk is not None:
                    report, self.after_warm_chunk = self.after_warm_chunk, None
                    report(self.seconds_per_point)
            if self.bar is not None:
                self.bar.update(1)
        self.n_queries += n_points

    @staticmethod
    def _chunks(axes, step: int, point_ids: torch.Tensor | None):
        """(where in the flat volume, a function making the chunk's points) per chunk.

        All points: whole x-slabs are built from one precomputed (y, z) plane by slicing, so
        a chunk costs no index arithmetic (TripoSR's loop slices a prebuilt grid; this is as
        cheap without building it). Chosen points: coordinates from their flat indices.
        """
        nx, ny, nz = (len(a) for a in axes)
        if point_ids is not None:
            for start in range(0, point_ids.numel(), step):
                ids = point_ids[start : start + step]

                def make(ids=ids):
                    x, y, z = ids // (ny * nz), (ids // nz) % ny, ids % nz
                    return torch.stack([axes[0][x], axes[1][y], axes[2][z]], dim=-1)

                yield ids, make
            return
        plane = torch.stack(torch.meshgrid(axes[1], axes[2], indexing="ij"), -1).reshape(-1, 2)
        size = len(plane)  # Y*Z points per x-slab
        slabs = max(1, step // size)  # whole slabs per chunk when a slab is smaller than a chunk
        for x0 in range(0, nx, slabs):
            xs = axes[0][x0 : x0 + slabs]  # (S,)
            for start in range(0, size, step):
                rows = plane[start : start + step]  # (N, 2)
                first = x0 * size + start
                target = slice(first, first + len(xs) * len(rows))  # contiguous: x slowest

                def make(xs=xs, rows=rows):
                    x = xs.repeat_interleave(len(rows))[:, None]
                    return torch.cat([x, rows.repeat(len(xs), 1)], dim=-1)

                yield target, make


def sample_dense(query: GridQuery, axis: torch.Tensor, lo, hi) -> torch.Tensor:
    """(X, Y, Z) level volume of the block of grid points lo..hi (inclusive), all queried."""
    axes = tuple(axis[a : b + 1] for a, b in zip(lo, hi, strict=True))
    level = torch.empty(tuple(len(ax) for ax in axes), device=axis.device)
    query(axes, level.view(-1))
    return level


def coarse_ids(resolution: int, step: int, device) -> torch.Tensor:
    """Fine indices of the coarse planes: every step-th one, plus the last."""
    ids = torch.arange(0, resolution, step, device=device)
    if ids[-1] != resolution - 1:
        ids = torch.cat([ids, ids.new_tensor([resolution - 1])])
    return ids


class Band:
    """Selected coarse cells (`selected`, (K-1,)^3) and how a block is sampled from them:
    every point of a selected cell is queried, the rest is filled by `_fill`.
    """

    step: int  # fine cells per coarse cell
    n_coarse: int  # coarse planes per axis
    selected: torch.Tensor  # (K-1, K-1, K-1) bool
    # (K,) fine indices of the coarse planes when `_fill` gives the queried value at the
    # coarse points (so they are not queried again); None when it gives only a sign.
    known_planes: torch.Tensor | None = None

    def _fill(self, fine: list[torch.Tensor], cells) -> torch.Tensor:
        raise NotImplementedError

    @property
    def fine_queries_estimate(self) -> int:
        """About how many points sampling every block will query."""
        return int(self.selected.sum()) * self.step**3

    def _cells_of(self, fine_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (up to two) coarse cells along one axis that contain each fine index."""
        last = self.n_coarse - 2
        below = ((fine_ids + self.step - 1) // self.step - 1).clamp(0, last)
        above = (fine_ids // self.step).clamp(0, last)
        return below, above

    def sample(self, query: GridQuery, axis: torch.Tensor, lo, hi) -> torch.Tensor:
        """(X, Y, Z) level volume of the block of grid points lo..hi (inclusive)."""
        fine = [torch.arange(a, b + 1, device=axis.device) for a, b in zip(lo, hi, strict=True)]
        cells = [self._cells_of(ids) for ids in fine]  # per axis: (cell below, cell above)
        level = self._fill(fine, cells)
        block_cells = tuple(slice(below[0], above[-1] + 1) for below, above in cells)
        if not self.selected[block_cells].any():  # far from the surface: nothing to refine
            return level
        # Query a point when any cell containing it is selected; the "any" is separable, so
        # it is taken one axis at a time: (K,K,K) -> (X,K,K) -> (X,Y,K) -> (X,Y,Z).
        # (Indexing, not index_select: that is 8x slower on inner dimensions on the CPU.)
        (below_x, above_x), (below_y, above_y), (below_z, above_z) = cells
        wanted = self.selected[below_x] | self.selected[above_x]
        wanted = wanted[:, below_y] | wanted[:, above_y]
        wanted = wanted[:, :, below_z] | wanted[:, :, above_z]
        if self.known_planes is not None:
            known_x, known_y, known_z = (torch.isin(ids, self.known_planes) for ids in fine)
            wanted &= ~(known_x[:, None, None] & known_y[None, :, None] & known_z[None, None, :])
        point_ids = torch.nonzero(wanted.reshape(-1)).squeeze(1)
        query(tuple(axis[ids] for ids in fine), level.view(-1), point_ids)
        return level


class CoarseToFine(Band):
    """A coarse grid every `coarse_step` points; cells whose corners change sign are selected,
    and, given `log_margin`, cells with a corner whose density is within a factor
    e^log_margin of the (positive) threshold; then dilated by `margin` cells so that surface
    bulging into a same-sign cell is sampled too.
    """

    def __init__(
        self,
        query: GridQuery,
        axis: torch.Tensor,
        coarse_step: int,
        margin: int,
        log_margin: float | None = None,
    ):
        self.step = coarse_step
        ids = coarse_ids(len(axis), coarse_step, axis.device)
        self.n_coarse, self.known_planes = len(ids), ids
        coarse = torch.empty(self.n_coarse**3, device=axis.device)
        query((axis[ids],) * 3, coarse)
        self.coarse = coarse.view((self.n_coarse,) * 3)
        inside = (self.coarse > 0).to(torch.float32)[None, None]  # (1, 1, K, K, K)
        inside_fraction = F.avg_pool3d(inside, kernel_size=2, stride=1)  # (1, 1, K-1, K-1, K-1)
        selected = (inside_fraction > 0) & (inside_fraction < 1)
        if log_margin is not None:
            # density / threshold from the level (density - threshold); a density <= 0 is
            # infinitely far below a positive threshold.
            ratio = (self.coarse / query.threshold + 1).clamp(min=torch.finfo(torch.float32).tiny)
            near = (ratio.log().abs() < log_margin).to(torch.float32)[None, None]
            selected |= F.max_pool3d(near, kernel_size=2, stride=1) > 0  # any corner near
        selected = F.max_pool3d(selected.float(), 2 * margin + 1, stride=1, padding=margin)
        self.selected = selected[0, 0] > 0
        if log_margin is not None and self.selected.float().mean() > BAND_DENSE_ABOVE:
            # Not a band: the field is lumpy at the scale of coarse cells (random weights,
            # noise), where no margin is safe; every point is queried.
            self.selected.fill_(True)

    def _fill(self, fine, cells):
        # The nearest coarse point (at a coarse point, its own queried value). Outside
        # selected cells it is a corner of a cell whose corners all share one sign: the fill
        # has the right sign and no spurious crossing.
        near = [((ids + self.step // 2) // self.step).clamp(max=self.n_coarse - 1) for ids in fine]
        return self.coarse[near[0][:, None, None], near[1][None, :, None], near[2][None, None, :]]
