"""What training measures: losses on rendered rays (RGB MSE, mask BCE, LPIPS on patches,
depth L1), losses on labelled 3D points (occupancy, surface colour), and the validation
metrics (novel-view PSNR, mask IoU) of `validate`.

Targets follow the renderer: colours are composited on white (as `render_rays` composites),
masks are the object's coverage, depth is the distance along the unit ray (0 = miss).
Every term is computed in float32, outside autocast: BCE is not autocast-safe and bf16
rounding would swamp the small differences the late steps of training care about.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

_LPIPS_STATE: dict[str, object] = {}  # "model": the network or None; "told_rays": said why off


def load_lpips(
    device: torch.device | str, on_patches: bool = True, verbose: bool = True
) -> torch.nn.Module | None:
    """The LPIPS(VGG) network, or None with ONE message per process (and reason) when it
    cannot serve: single rays are no image, the package is missing, or its VGG weights
    cannot be downloaded (offline)."""
    if not on_patches:
        if verbose and not _LPIPS_STATE.get("told_rays"):
            print("LPIPS loss off: it needs image patches (sampling='patches'), not single rays.")
        _LPIPS_STATE["told_rays"] = True
        return None
    if "model" not in _LPIPS_STATE:
        try:
            import lpips

            network = lpips.LPIPS(net="vgg", verbose=False).eval()
            network.requires_grad_(False)
            _LPIPS_STATE["model"] = network
        except ImportError:
            _LPIPS_STATE["model"] = None
            reason = "the `lpips` package is not installed (pip install lpips)"
        except (OSError, RuntimeError) as error:  # download refused offline, or corrupt cache
            _LPIPS_STATE["model"] = None
            reason = f"its VGG weights could not be loaded ({error})"
        if _LPIPS_STATE["model"] is None and verbose:
            print(f"LPIPS loss off: {reason}; training uses the RGB and mask losses.")
    network = _LPIPS_STATE["model"]
    return None if network is None else network.to(device)


def render_loss(
    rendered: dict[str, torch.Tensor],
    target: dict[str, torch.Tensor],
    weights: dict[str, float],
    lpips_network: torch.nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """Weighted sum of the loss terms for one object's rays.

    rendered: rgb (..., 3), opacity (..., 1), depth (..., 1) from `TSR.render_rays`;
    target: rgb (..., 3) on white, mask (...), depth (...) with the same leading shape;
    patches are (P, S, S, ...) and only they get LPIPS. weights: rgb, mask, lpips, depth.
    -> {"loss": weighted total, "loss_rgb": ..., "loss_mask": ..., ...} (float32 scalars)
    """
    device_type = rendered["rgb"].device.type
    with torch.autocast(device_type, enabled=False):
        rgb = rendered["rgb"].float()
        opacity = rendered["opacity"].float().squeeze(-1)  # (...)
        terms = {"rgb": F.mse_loss(rgb, target["rgb"].float())}
        if weights.get("mask", 0.0) > 0:
            # clamped: an opacity of exactly 0 or 1 would give log(0). A NaN opacity (diverged
            # weights) would make the BCE raise before the loop's non-finite check can stop
            # training with its message; the colour term carries the NaN there instead.
            opacity = torch.nan_to_num(opacity, nan=0.5).clamp(1e-5, 1 - 1e-5)
            terms["mask"] = F.binary_cross_entropy(opacity, target["mask"].float())
        if weights.get("depth", 0.0) > 0:
            # only where the target ray hits the object: background depth is a 0 placeholder
            hit = target["mask"] > 0.5
            depth_error = (rendered["depth"].float().squeeze(-1) - target["depth"].float()).abs()
            terms["depth"] = depth_error[hit].mean() if hit.any() else depth_error.sum() * 0
        if weights.get("lpips", 0.0) > 0 and lpips_network is not None and rgb.dim() == 4:
            # LPIPS wants (P, 3, S, S) images in [-1, 1]
            to_lpips = "p h w c -> p c h w"
            terms["lpips"] = lpips_network(
                rearrange(rgb, to_lpips) * 2 - 1, rearrange(target["rgb"].float(), to_lpips) * 2 - 1
            ).mean()
        total = sum(weights.get(name, 0.0) * value for name, value in terms.items())
    return {"loss": total, **{f"loss_{name}": value.detach() for name, value in terms.items()}}


SDF_LOGIT_CLAMP = 5.0  # |logit| the signed-distance target saturates at: density_act x/÷ e^5


def occupancy_losses(
    model, scene_code: torch.Tensor, item: dict, n_points: int, level: float, generator,
    sdf_scale: float = 0.0, colour_band: float = 0.0,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """3D supervision at `n_points` of the item's labelled points (drawn with replacement).

    occupancy: the logit is log(density_act / level), so the surface lies exactly at
    density_act = level and the marching-cubes threshold becomes a property of the training.
    With sdf_scale = 0 it is a BCE against the inside/outside labels; with sdf_scale > 0 a
    smooth L1 against clamp(-sdf_scale * signed distance, ±SDF_LOGIT_CLAMP): a point 0.01
    outside and one 0.3 outside then ask for different things, not both for "outside".
    surface_colour (colour_band > 0, items with colours): MSE between the decoded colour and
    the rendered colour of the nearest surface point, at points within colour_band of it,
    where volume rendering takes its colour from.
    item: occupancy_points (N, 3), occupancy (N,), optionally occupancy_sdf (N,) and
    occupancy_colour (N, 3), as `MultiViewDataset` reads them. -> {"occupancy"[, "surface_colour"]}
    """
    points = item["occupancy_points"]
    chosen = torch.randint(len(points), (min(n_points, len(points)),), generator=generator)
    device = scene_code.device
    decoded = model.renderer.query_triplane(model.decoder, points[chosen].to(device), scene_code)
    terms = {}
    with torch.autocast(device.type, enabled=False):
        logit = decoded["density"][:, 0].float() + model.renderer.config.density_bias
        logit = logit - math.log(level)
        if sdf_scale > 0:
            sdf = item["occupancy_sdf"][chosen].to(device)
            target = (-sdf_scale * sdf).clamp(-SDF_LOGIT_CLAMP, SDF_LOGIT_CLAMP)
            terms["occupancy"] = F.smooth_l1_loss(logit, target)
        else:
            inside = item["occupancy"][chosen].to(device).float()
            terms["occupancy"] = F.binary_cross_entropy_with_logits(logit, inside)
        if colour_band > 0 and "occupancy_colour" in item:
            near = (item["occupancy_sdf"][chosen].abs() < colour_band).to(device)
            error = (decoded["color"].float() - item["occupancy_colour"][chosen].to(device)) ** 2
            terms["surface_colour"] = error[near].mean() if near.any() else error.sum() * 0
    return terms
