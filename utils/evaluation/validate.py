"""Validation during training: novel-view loss, PSNR and mask IoU on held-out objects.

The loss is passed in by the caller (training's `render_loss`), so evaluation never imports
training.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from tsr.cameras import pixel_to_ray
from utils.data.dataset import novel_views
from utils.evaluation.metrics import mask_iou, psnr


@torch.no_grad()
def validate(
    model,
    dataset,
    n_objects: int,
    rays_per_view: int,
    loss_fn: Callable[[dict, dict], torch.Tensor],
) -> dict[str, float]:
    """Novel-view loss, PSNR and mask IoU of the first `n_objects` objects, on a regular grid
    of about `rays_per_view` pixels of each novel view (cheap, unbiased).

    loss_fn(rendered, target) -> scalar: the training loss on rendered rays, so validation and
    training measure the same quantity. -> {"val_loss", "val_psnr", "val_mask_iou"}: means
    over the objects that have novel views
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    totals = {"val_loss": 0.0, "val_psnr": 0.0, "val_mask_iou": 0.0}
    n_scored = 0
    for index in range(min(len(dataset), n_objects)):
        item = dataset[index]
        views = novel_views(item)
        if not views:  # only the conditioning view: nothing unseen to score
            continue
        scene_code = model.encode(item["cond_image"][None].to(device))[0]
        _, height, width, _ = item["rgb"].shape
        stride = max(1, round(math.sqrt(height * width / rays_per_view)))
        grid = torch.arange(stride // 2, height, stride), torch.arange(stride // 2, width, stride)
        pixels = torch.cartesian_prod(*grid)  # (N, 2) as (row, column)
        rows, cols = pixels[:, 0], pixels[:, 1]
        rendered, truth = [], []
        for view in views:
            rays_o, rays_d = pixel_to_ray(
                item["c2w"][view], pixels, height, width, item["fovy_deg"]
            )
            rendered.append(model.render_rays(scene_code, rays_o.to(device), rays_d.to(device)))
            truth.append(
                {k: item[k][view][rows, cols].to(device) for k in ("rgb", "mask", "depth")}
            )
        rendered = {k: torch.cat([r[k] for r in rendered]) for k in rendered[0]}
        truth = {k: torch.cat([t[k] for t in truth]) for k in truth[0]}
        totals["val_loss"] += float(loss_fn(rendered, truth))
        totals["val_psnr"] += float(psnr(rendered["rgb"], truth["rgb"]))
        totals["val_mask_iou"] += float(mask_iou(rendered["opacity"], truth["mask"]))
        n_scored += 1
    model.train(was_training)
    return {key: value / n_scored if n_scored else math.nan for key, value in totals.items()}
