"""The certified sampler: coarse-to-fine with a proof from a Lipschitz bound on the density.

A cell is left unqueried only when its corner values prove that the density stays on one side
of the threshold inside it, so the mesh is the dense one (tsr.grid_sampling has the others).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from tsr.grid_sampling import Band, GridQuery, coarse_ids

# The bound of a certified cell is inflated by this factor: the level volume is rounded to
# float32 (relative error 2^-24), so a proof by a narrower margin would not be one.
ROUNDING_SLACK = 1 + 2**-20


def _corner_range(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, K, K) values at grid points -> min and max (K-1, K-1, K-1) over each cell's corners
    (NaN where a corner is NaN)."""
    k = values.shape[0] - 1
    low = high = values[:k, :k, :k]
    for i, j, m in itertools.product((0, 1), repeat=3):
        corner = values[i : i + k, j : j + k, m : m + k]
        low, high = torch.minimum(low, corner), torch.maximum(high, corner)
    return low, high


class Certified(Band):
    """Coarse-to-fine with a proof: `lipschitz` bounds |density(a) - density(b)| / |a - b|
    (world units) everywhere in the box, so a cell whose corners all lie farther from the
    threshold than the density can change within the cell cannot hold any surface.

    A point of a cell is within half the cell's diagonal d of its nearest corner and within d
    of every corner, so a cell is certain when its corners share a sign and either all of them
    are more than L*d/2 from the threshold or one is more than L*d. Cells start `top` points
    wide; uncertain ones are split in 8, down to `coarse_step`, where they are queried at
    every point. Each level queries only the corners it has not seen.
    """

    def __init__(self, query: GridQuery, axis: torch.Tensor, coarse_step: int, lipschitz: float):
        resolution, device = len(axis), axis.device
        voxel = float(axis[1] - axis[0])  # world units between grid planes
        levels = max(0, int(math.log2(max((resolution - 1) / (8 * coarse_step), 1))))
        steps = [coarse_step * 2**k for k in range(levels, -1, -1)]  # coarse to fine
        examined = values = previous_ids = None
        certain_at = []  # (step, cells proven inside, cells proven outside) per level
        for step in steps:
            ids = coarse_ids(resolution, step, device)
            n = len(ids)
            known = torch.full((n,) * 3, torch.nan, device=device)
            if values is None:
                examined = torch.ones((n - 1,) * 3, dtype=torch.bool, device=device)
            else:  # the previous level's corners are this level's even ones (and the last)
                where = torch.searchsorted(ids, previous_ids)
                known[where[:, None, None], where[None, :, None], where[None, None, :]] = values
            # Corners of examined cells, less those already known.
            corners = F.max_pool3d(examined[None, None].float(), 2, stride=1, padding=1)[0, 0] > 0
            todo = torch.nonzero((corners & known.isnan()).reshape(-1)).squeeze(1)
            query((axis[ids],) * 3, known.view(-1), todo)
            low, high = _corner_range(known)  # NaN only off examined cells
            nearest = torch.minimum(low.abs(), high.abs())
            farthest = torch.maximum(low.abs(), high.abs())
            change = lipschitz * math.sqrt(3) * step * voxel * ROUNDING_SLACK  # L * diagonal
            one_sign = (low > 0) | (high < 0)
            certain = examined & one_sign & ((nearest > change / 2) | (farthest > change))
            certain_at.append((step, certain & (low > 0), certain & (high < 0)))
            uncertain = examined & ~certain
            if step != steps[-1]:  # split: child c of parent c // 2, cut at the grid's end
                n_child = len(coarse_ids(resolution, step // 2, device)) - 1
                examined = uncertain
                for dim in range(3):
                    examined = examined.repeat_interleave(2, dim=dim).narrow(dim, 0, n_child)
            values, previous_ids = known, ids
        self.step, self.n_coarse, self.selected = coarse_step, len(ids), uncertain
        # +1 inside, -1 outside, 0 selected, per leaf cell, from the level that proved it.
        self.sign = torch.zeros((self.n_coarse - 1,) * 3, dtype=torch.int8, device=device)
        for step, inside, outside in certain_at:
            factor = step // coarse_step
            proven = inside.to(torch.int8) - outside.to(torch.int8)
            for dim in range(3):
                proven = proven.repeat_interleave(factor, dim=dim).narrow(dim, 0, self.n_coarse - 1)
            self.sign += proven  # each leaf cell is proven at most once

    def _fill(self, fine, cells):
        # Unqueried points lie only in proven cells, and every proven cell holding a point
        # gives it the same sign; +-1 has it (only crossing edges' ends shape the mesh).
        below = [below for below, _ in cells]
        sign = self.sign[below[0][:, None, None], below[1][None, :, None], below[2][None, None, :]]
        return sign.to(torch.float32)
