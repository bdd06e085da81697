"""Volume rendering and cameras against analytic answers: empty space is the white
background, a slab of constant density has the opacity and depth of a closed-form sum, a
pixel's ray lands where the pinhole formula (written out by hand) projects its points, and
whole images rendered in chunks equal their rays rendered one camera at a time."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tsr.cameras import focal_length, look_at, pixel_directions, pixel_to_ray, rays_from_c2w
from tsr.config import named_config
from tsr.model import TSR
from tsr.renderer import TriplaneNeRFRenderer, ray_cube_radius

# ---- a hand-made scene: the triplane holds x itself, the decoder turns x into a slab

PLANE_WIDTH = 2048  # texels along x: the ramp is exact to 1/2048 of the cube's edge


def x_ramp_triplane(radius: float) -> torch.Tensor:
    """Planes (xy, xz, yz) of one channel, 2 rows (y or z) by PLANE_WIDTH columns; the xy
    and xz planes hold each texel centre's world x, so bilinear sampling returns x exactly
    for points on the x axis. -> (3, 1, 2, PLANE_WIDTH)"""
    centres = (2 * torch.arange(PLANE_WIDTH, dtype=torch.float64) + 1) / PLANE_WIDTH - 1
    ramp = (radius * centres).float().expand(2, PLANE_WIDTH)
    return torch.stack([ramp, ramp, torch.zeros_like(ramp)])[:, None]


class SlabDecoder(nn.Module):
    """density_act = sigma where low <= x <= high (x: the xy-plane feature), 0 elsewhere;
    colour `colour` everywhere. Features (N, 3) -> raw (N, 4)."""

    def __init__(self, sigma: float, low: float, high: float, colour, density_bias: float):
        super().__init__()
        self.sigma, self.low, self.high, self.bias = sigma, low, high, density_bias
        self.colour_logit = torch.logit(torch.tensor(colour))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features[:, 0]
        inside = (x >= self.low) & (x <= self.high)
        log_density = math.log(self.sigma) - self.bias if self.sigma > 0 else -1e4
        density = torch.where(inside, log_density, -1e4)  # exp(-1e4) is 0 in float32
        return torch.cat([density[:, None], self.colour_logit.expand(len(x), 3)], dim=-1)


@pytest.fixture
def renderer() -> TriplaneNeRFRenderer:
    return TriplaneNeRFRenderer(named_config("tiny").renderer)  # 16 samples per ray


def x_axis_rays(n: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays from x = -2 along +x, through the cube's centre."""
    return torch.tensor([[-2.0, 0, 0]]).expand(n, 3), torch.tensor([[1.0, 0, 0]]).expand(n, 3)


def test_empty_space_renders_the_background_exactly(renderer):
    decoder = SlabDecoder(0.0, -1.0, 1.0, (0.2, 0.4, 0.6), renderer.config.density_bias)
    triplane = x_ramp_triplane(renderer.config.radius)
    rays_o, rays_d = x_axis_rays()
    missing_o = torch.tensor([[-2.0, 5.0, 0]])  # passes beside the cube
    out = renderer.render_rays(
        decoder, triplane, torch.cat([rays_o, missing_o]), torch.cat([rays_d, rays_d])
    )
    assert torch.equal(out["rgb"], torch.ones(2, 3))
    assert torch.equal(out["opacity"], torch.zeros(2, 1))
    assert torch.equal(out["depth"], torch.zeros(2, 1))


@pytest.mark.parametrize("sigma, first, count", [(3.0, 5, 4), (40.0, 2, 10), (0.5, 0, 16)])
def test_a_constant_slab_has_the_closed_form_opacity_colour_and_depth(
    renderer, sigma, first, count
):
    """The ray crosses the cube from t_near = 2 - r' to t_far = 2 + r' in S equal intervals
    of length d = 2r'/S; the slab covers `count` of them starting at interval `first`.

    matches TripoSR: density is integrated over the ray's length within the cube taken as 1,
    so the slab's optical depth is sigma * (slab length / in-cube length) = sigma * count/S:
    opacity = 1 - exp(-sigma * count / S). With q = exp(-sigma / S) per interval, the
    weights are (1 - q) q^i (i = 0..count-1), and the depth (their mean distance) is
    t_first + d * sum(i q^i) (1 - q) / (1 - q^count), with the geometric series
    sum_{i<k} i q^i = q (1 - k q^(k-1) + (k-1) q^k) / (1 - q)^2."""
    n_samples, half = renderer.config.num_samples_per_ray, ray_cube_radius(renderer.config.radius)
    step = 2 * half / n_samples
    low, high = -half + first * step, -half + (first + count) * step  # on interval edges
    colour = (0.2, 0.4, 0.6)
    decoder = SlabDecoder(sigma, low, high, colour, renderer.config.density_bias)
    out = renderer.render_rays(decoder, x_ramp_triplane(renderer.config.radius), *x_axis_rays())

    opacity = 1 - math.exp(-sigma * (high - low) / (2 * half))
    assert float(out["opacity"]) == pytest.approx(opacity, rel=1e-5)
    expected_rgb = [c * opacity + (1 - opacity) for c in colour]  # composited on white
    assert out["rgb"][0].tolist() == pytest.approx(expected_rgb, rel=1e-5)
    q, k = math.exp(-sigma / n_samples), count
    series = q * (1 - k * q ** (k - 1) + (k - 1) * q**k) / (1 - q) ** 2
    t_first = (2 - half) + (first + 0.5) * step  # the first sample inside the slab
    depth = t_first + step * series * (1 - q) / (1 - q**k)
    assert float(out["depth"]) == pytest.approx(depth, rel=1e-5)


def test_tiny_model_opacity_and_colour_stay_in_range_even_when_dense():
    """Opacity is the sum of the ray's weights: never above 1, even for density so high that
    every sample is opaque; colours composite within [0, 1]."""
    model = TSR.from_pretrained("tiny")
    code = model.encode(torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0)))[0]
    generator = torch.Generator().manual_seed(1)
    rays_o = torch.nn.functional.normalize(torch.randn(256, 3, generator=generator), dim=-1) * 1.9
    rays_d = torch.nn.functional.normalize(-rays_o + 0.3 * torch.randn(256, 3, generator=generator))
    for bias in (-1.0, 12.0):  # the tiny model's own, and exp(12): opaque within one sample
        model.renderer.config.density_bias = bias
        with torch.no_grad():
            out = model.render_rays(code, rays_o, rays_d)
        assert (out["opacity"] >= 0).all() and (out["opacity"] <= 1 + 1e-6).all()
        assert (out["rgb"] >= 0).all() and (out["rgb"] <= 1 + 1e-6).all()
    assert out["opacity"].max() > 0.999  # the dense case did saturate


# ---- cameras: the pinhole formula, by hand


def project_by_hand(point: torch.Tensor, camera: str, height: int, width: int, fovy: float):
    """Continuous pixel coordinates (row, column), pixel (j, i) spanning [j, j+1) x [i, i+1),
    of a world point seen by a camera at distance 2 looking at the origin, up +z:
    at +x its image right is +y; at +y its image right is -x (right = forward x up)."""
    f = 0.5 * height / math.tan(math.radians(fovy) / 2)
    x, y, z = point.tolist()
    if camera == "+x":
        depth, right = 2 - x, y
    else:  # "+y"
        depth, right = 2 - y, -x
    return height / 2 - f * z / depth, width / 2 + f * right / depth


CAMERA_CENTRES = {"+x": [2.0, 0, 0], "+y": [0, 2.0, 0]}


@pytest.mark.parametrize("camera", ["+x", "+y"])
def test_each_pixels_ray_passes_where_the_pinhole_formula_projects(camera):
    height, width, fovy = 48, 64, 40.0  # not square: rows and columns cannot be swapped
    c2w = look_at(torch.tensor([CAMERA_CENTRES[camera]]))
    pixels = torch.tensor([[0, 0], [10, 40], [47, 63], [24, 32], [5, 60]])  # (row, column)
    rays_o, rays_d = rays_from_c2w(c2w, height, width, fovy)
    picked_o, picked_d = pixel_to_ray(c2w[0], pixels, height, width, fovy)
    for (row, column), origin, direction in zip(pixels.tolist(), picked_o, picked_d, strict=True):
        torch.testing.assert_close(rays_o[0, row, column], origin)
        torch.testing.assert_close(rays_d[0, row, column], direction)
        assert float(direction.norm()) == pytest.approx(1.0, abs=1e-6)
        for distance in (1.0, 2.5):  # any point along the ray projects to the pixel's centre
            point = origin + distance * direction
            projected = project_by_hand(point, camera, height, width, fovy)
            assert projected == pytest.approx((row + 0.5, column + 0.5), abs=1e-3)


def test_pixel_directions_of_known_pixels():
    height, width, fovy = 48, 64, 40.0
    f = focal_length(fovy, height)
    assert f == pytest.approx(24 / math.tan(math.radians(20)))
    # row 23.5, column 31.5 is the exact centre of the image: straight ahead
    centre = pixel_directions(torch.tensor(23.5), torch.tensor(31.5), height, width, fovy)
    torch.testing.assert_close(centre, torch.tensor([0.0, 0.0, -1.0]))
    top_left = pixel_directions(torch.tensor(0), torch.tensor(0), height, width, fovy)
    expected = torch.tensor([-31.5 / f, 23.5 / f, -1.0])  # left, up, forward (-z)
    torch.testing.assert_close(top_left, expected / expected.norm())
    # the top edge is fovy / 2 above the axis: the half-pixel-up row's angle
    edge = pixel_directions(torch.tensor(-0.5), torch.tensor(31.5), height, width, fovy)
    assert math.degrees(math.atan2(float(edge[1]), -float(edge[2]))) == pytest.approx(20.0)


def test_images_rendered_in_chunks_equal_their_rays_rendered_one_camera_at_a_time():
    model = TSR.from_pretrained("tiny")
    code = model.encode(torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0)))[0]
    c2w = look_at(torch.tensor([[1.9, 0.3, 0.4], [-0.5, 1.6, -0.8]]))
    height, width = 12, 10
    with torch.no_grad():
        chunked = model.render_cameras(code, c2w, 40.0, height, width, ray_chunk=7)
        rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        pixels = torch.stack([rows.flatten(), cols.flatten()], dim=-1)
        for view in range(2):
            rays_o, rays_d = pixel_to_ray(c2w[view], pixels, height, width, 40.0)
            expected = model.render_rays(code, rays_o, rays_d)
            for key in ("rgb", "opacity", "depth"):
                torch.testing.assert_close(
                    chunked[key][view].reshape(height * width, -1), expected[key]
                )
    assert chunked["rgb"][0].std() > 0  # the scene is not a flat colour: the test could fail
