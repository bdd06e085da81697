"""Triplane NeRF: query features at 3D points, decode them, and volume-render rays.

One `query_triplane` serves volume rendering, marching cubes and the tests. Everything here
is differentiable; `TSR.render` wraps it in no-grad for pictures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import RendererConfig

# matches TripoSR: its default points per decoder call; also the fastest chunk on a 2-core CPU
# for a TripoSR-sized decoder (tsr/mesh.py measures it)
DECODER_CHUNK = 8192


def ray_cube_radius(radius: float) -> float:
    """Half-size of the cube rays are cut to, for a scene in [-radius, radius]^3.

    matches TripoSR: the cube is shrunk by 1e-3 so no sample lands on the triplane's edge
    texels; the dataset builder keeps objects inside this same cube.
    """
    return radius * (1 - 1e-3)


def ray_box_intersection(
    rays_o: torch.Tensor, rays_d: torch.Tensor, half_size: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slab test against the cube [-half_size, half_size]^3.

    (R, 3), (R, 3) -> t_near (R,), t_far (R,), valid (R,); t_near is clamped to 0 so rays that
    start inside the cube begin at their origin.
    """
    # A zero direction component would give 0 * inf; a tiny one gives the same +-inf slab.
    safe_d = torch.where(rays_d.abs() < 1e-12, torch.full_like(rays_d, 1e-12), rays_d)
    t0 = (-half_size - rays_o) / safe_d
    t1 = (half_size - rays_o) / safe_d
    t_near = torch.minimum(t0, t1).amax(dim=-1).clamp(min=0.0)
    t_far = torch.maximum(t0, t1).amin(dim=-1)
    # matches TripoSR: rays that cross less than 0.01 of the cube count as misses
    valid = (t_far - t_near) > 0.01
    return t_near, t_far, valid


class TriplaneNeRFRenderer(nn.Module):
    def __init__(self, config: RendererConfig):
        super().__init__()
        if config.feature_reduction != "concat" or config.density_activation != "exp":
            raise ValueError(
                "only feature_reduction='concat' and density_activation='exp' are built"
            )
        self.config = config
        self.chunk_size = DECODER_CHUNK  # points per decoder call; 0 = all at once

    def set_chunk_size(self, chunk_size: int) -> None:
        if chunk_size < 0:
            raise ValueError(f"chunk_size must be >= 0 (0 = no chunking), got {chunk_size}")
        self.chunk_size = chunk_size

    def sample_triplane(self, positions: torch.Tensor, triplane: torch.Tensor) -> torch.Tensor:
        """Bilinear plane features at world points. (N, 3), (3, C, H, W) -> (N, 3*C)"""
        radius = self.config.radius
        coords = (positions + radius) / (2 * radius) * 2 - 1  # [-r, r] -> [-1, 1]
        # Planes (x,y), (x,z), (y,z); the first coordinate goes to grid_sample's width axis.
        plane_coords = torch.stack([coords[:, [0, 1]], coords[:, [0, 2]], coords[:, [1, 2]]])
        features = F.grid_sample(
            triplane,
            plane_coords[:, None].to(triplane.dtype),  # (3, 1, N, 2)
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        )  # (3, C, 1, N)
        return rearrange(features, "np c 1 n -> n (np c)")

    def query_triplane(
        self, decoder: nn.Module, positions: torch.Tensor, triplane: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Decode density and colour at points. positions (..., 3), triplane (3, C, H, W).

        -> density, density_act (..., 1); features, color (..., 3)
        """
        flat = positions.reshape(-1, 3)
        n_points = flat.shape[0]
        step = self.chunk_size if self.chunk_size > 0 else max(n_points, 1)
        raw = torch.cat(
            [
                decoder(self.sample_triplane(flat[start : start + step], triplane))
                for start in range(0, n_points, step)
            ]
            or [flat.new_zeros(0, 4)]
        )  # (N, 4)
        raw = raw.reshape(*positions.shape[:-1], 4)
        density, features = raw[..., :1], raw[..., 1:]
        return {
            "density": density,
            "density_act": torch.exp(density + self.config.density_bias),
            "features": features,
            "color": torch.sigmoid(features),
        }

    def render_rays(
        self,
        decoder: nn.Module,
        triplane: torch.Tensor,
        rays_o: torch.Tensor,
        rays_d: torch.Tensor,
        background: float = 1.0,
    ) -> dict[str, torch.Tensor]:
        """Volume-render rays through one scene. rays (..., 3) with unit directions.

        -> rgb (..., 3) composited on `background`, opacity (..., 1), depth (..., 1): the
        expected distance along the ray where it hits (0 for misses; divide-by-opacity form,
        comparable with a ray-distance depth map).
        """
        batch_shape = rays_o.shape[:-1]
        rays_o, rays_d = rays_o.reshape(-1, 3), rays_d.reshape(-1, 3)
        n_samples = self.config.num_samples_per_ray
        t_near, t_far, valid = ray_box_intersection(
            rays_o, rays_d, ray_cube_radius(self.config.radius)
        )
        # Midpoints of n equal intervals between the cube's entry and exit; no jitter.
        t_edges = torch.linspace(0, 1, n_samples + 1, device=rays_o.device)
        t_mid = (t_edges[:-1] + t_edges[1:]) / 2  # (S,)
        near, far = t_near[valid, None], t_far[valid, None]
        z = near * (1 - t_mid) + far * t_mid  # (Rv, S)
        positions = rays_o[valid, None] + rays_d[valid, None] * z[..., None]  # (Rv, S, 3)
        decoded = self.query_triplane(decoder, positions, triplane)
        # matches TripoSR: the weights depend on interval length 1/S, not the metric length
        alpha = 1 - torch.exp(-decoded["density_act"][..., 0] / n_samples)  # (Rv, S)
        transmittance = torch.cumprod(1 - alpha + 1e-10, dim=-1)
        transmittance = torch.cat([torch.ones_like(alpha[:, :1]), transmittance[:, :-1]], dim=-1)
        weights = alpha * transmittance  # (Rv, S)
        opacity_valid = weights.sum(-1, keepdim=True)  # (Rv, 1)
        rgb_valid = (weights[..., None] * decoded["color"]).sum(-2)  # (Rv, 3)
        depth_valid = (weights * z).sum(-1, keepdim=True) / opacity_valid.clamp(min=1e-6)

        # In the dtype the decoder gave: a half-precision model's (fp16 rgb, fp32 depth from
        # the fp32 sample distances) differs from the rays'.
        n_rays = rays_o.shape[0]
        rgb = rgb_valid.new_zeros(n_rays, 3).index_put((valid,), rgb_valid)
        opacity = opacity_valid.new_zeros(n_rays, 1).index_put((valid,), opacity_valid)
        depth = depth_valid.new_zeros(n_rays, 1).index_put((valid,), depth_valid)
        rgb = rgb + (1 - opacity) * background
        return {
            "rgb": rgb.reshape(*batch_shape, 3),
            "opacity": opacity.reshape(*batch_shape, 1),
            "depth": depth.reshape(*batch_shape, 1),
        }
