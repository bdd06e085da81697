"""Which views evaluation and validation score, seen through a model whose picture depends on
the camera: each view's truth differs from that picture by a known offset, so scoring the
wrong view, or view 0, gives a different, hand-predictable PSNR."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from test_oracles_metrics import unit_square
from torch import nn

from tsr.cameras import look_at, orbit_positions
from tsr.model import TSR
from utils.data.dataset import novel_views
from utils.evaluation.evaluate import evaluate_model
from utils.evaluation.validate import validate

SIZE = 8  # pixels per side of every view
PLANE_SHIFT = 0.03  # the predicted mesh is the true square this far above it


def camera_colour(origins: torch.Tensor) -> torch.Tensor:
    """The fake model's colour for rays from a camera centre: a function of where it is."""
    return 0.5 + 0.2 * torch.nn.functional.normalize(origins, dim=-1)


class CameraColourModel(nn.Module):
    """Renders every ray in its camera's colour, opacity 1; meshes a fixed mesh."""

    render_cameras = TSR.render_cameras  # the real chunking and camera code

    def __init__(self, mesh: trimesh.Trimesh):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # validate() reads the device from it
        self.mesh, self.origins = mesh, set()

    def encode(self, cond_image: torch.Tensor) -> torch.Tensor:
        return torch.zeros(cond_image.shape[0], 3, 1, 2, 2)

    def render_rays(self, scene_code, rays_o, rays_d) -> dict[str, torch.Tensor]:
        self.origins |= {tuple(o) for o in rays_o.reshape(-1, 3).unique(dim=0).tolist()}
        ones = torch.ones(*rays_o.shape[:-1], 1)
        return {"rgb": camera_colour(rays_o), "opacity": ones, "depth": ones}

    def extract_mesh(
        self, scene_codes, has_vertex_color=True, resolution=256, threshold=None, method="auto"
    ):
        return [self.mesh.copy() for _ in scene_codes]


def make_item(object_id: str, view_indices: list[int], offsets: list[float]) -> dict:
    """Views at azimuths 40 x view index; view k's truth is the camera colour minus
    offsets[k] everywhere; its mask covers the top half in position 1, everything else."""
    azimuth = torch.tensor([40.0 * v for v in view_indices])
    positions = orbit_positions(azimuth, torch.full_like(azimuth, 10.0), 1.9)
    colours = camera_colour(positions) - torch.tensor(offsets)[:, None]  # (V, 3)
    mask = torch.ones(len(view_indices), SIZE, SIZE)
    if len(view_indices) > 1:
        mask[1, SIZE // 2 :] = 0
    return {
        "object_id": object_id,
        "cond_image": torch.zeros(SIZE, SIZE, 3),
        "rgb": colours[:, None, None, :].expand(-1, SIZE, SIZE, 3).clone(),
        "mask": mask,
        "depth": torch.ones(len(view_indices), SIZE, SIZE),
        "c2w": look_at(positions),
        "fovy_deg": 40.0,
        "view_indices": torch.tensor(view_indices),
    }


class ItemsDataset:
    """A dataset of ready items, with the ground-truth square where evaluation reads it."""

    def __init__(self, root: Path, items: list[dict]):
        self.root, self.items = root, items
        self.object_ids = [item["object_id"] for item in items]
        for oid in self.object_ids:
            (root / oid).mkdir(parents=True, exist_ok=True)
            unit_square().export(root / oid / "mesh.glb")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def psnr_of_offset(offset: float) -> float:
    return -20 * math.log10(offset)


def chromaticity_gap(colour: np.ndarray, offset: float) -> float:
    """L1 distance between the chromaticities of a colour and of the colour minus offset."""
    return float(np.abs(colour / colour.sum() - (colour - offset) / (colour - offset).sum()).sum())


def test_novel_views_are_positions_of_every_view_but_view_0():
    assert novel_views({"view_indices": torch.tensor([0, 2, 5])}) == [1, 2]
    assert novel_views({"view_indices": torch.tensor([3, 0, 1])}) == [0, 2]
    assert novel_views({"view_indices": torch.tensor([0])}) == []


def test_evaluation_scores_exactly_the_novel_views(tmp_path):
    # view 0 (never scored) is off by 0.3; views 2 and 5, at positions 1 and 2, by 0.1, 0.01
    item = make_item("object", [0, 2, 5], [0.3, 0.1, 0.01])
    dataset = ItemsDataset(tmp_path, [item])
    model = CameraColourModel(unit_square(PLANE_SHIFT))
    (record,) = evaluate_model(model, dataset, mc_resolution=8, n_points=2000)
    assert record["n_novel_views"] == 2
    # the renders came from exactly the cameras of views 2 and 5
    assert model.origins == {tuple(item["c2w"][k, :3, 3].tolist()) for k in (1, 2)}
    # mean of the per-view PSNRs: (20 + 40) / 2 dB (view 0 in the mean would give 22.2)
    assert record["psnr"] == pytest.approx(
        (psnr_of_offset(0.1) + psnr_of_offset(0.01)) / 2, abs=1e-3
    )
    # opacity 1 everywhere against masks of half (position 1) and all (position 2) the image
    assert record["mask_iou"] == pytest.approx((0.5 + 1.0) / 2)
    colours = camera_colour(item["c2w"][:, :3, 3]).numpy()
    expected_colour = (chromaticity_gap(colours[1], 0.1) + chromaticity_gap(colours[2], 0.01)) / 2
    assert record["colour_error"] == pytest.approx(expected_colour, rel=1e-4)
    # the mesh is the true square shifted along its normal: Chamfer-L1 is the shift
    assert record["chamfer_l1"] == pytest.approx(PLANE_SHIFT, abs=1e-6)
    assert record["f@0.05"] == 1.0 and record["course_chamfer"] == pytest.approx(0, abs=1e-6)


def test_validation_scores_exactly_the_novel_views_of_the_first_objects(tmp_path):
    items = [
        make_item("scored", [0, 2, 5], [0.3, 0.1, 0.01]),
        make_item("only-view-0", [0], [0.3]),  # nothing unseen: skipped, not counted as 0
        make_item("beyond-n_objects", [0, 1], [0.3, 0.4]),
    ]
    model = CameraColourModel(unit_square())

    def mse(rendered: dict, target: dict) -> torch.Tensor:
        return (rendered["rgb"] - target["rgb"]).square().mean()

    scores = validate(model, ItemsDataset(tmp_path, items), 2, rays_per_view=16, loss_fn=mse)
    # the same number of rays from views 2 and 5: mse (0.1^2 + 0.01^2) / 2 over them together
    expected_mse = (0.1**2 + 0.01**2) / 2
    assert scores["val_loss"] == pytest.approx(expected_mse, rel=1e-4)
    assert scores["val_psnr"] == pytest.approx(-10 * math.log10(expected_mse), abs=1e-3)
    # a 4 x 4 grid of pixels per view: the top half of position 1's mask and all of
    # position 2's, against opacity 1 everywhere -> IoU (8 + 16) / 32
    assert scores["val_mask_iou"] == pytest.approx(0.75)
    assert model.origins == {tuple(items[0]["c2w"][k, :3, 3].tolist()) for k in (1, 2)}
