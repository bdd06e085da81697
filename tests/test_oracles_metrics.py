"""Metric values against independent oracles: hand computations on a few numbers, analytic
shapes (a plane shifted along its normal), and second implementations written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import trimesh
from scipy.spatial import cKDTree

from utils.evaluation import metrics
from utils.evaluation.metrics import (
    SPHERE_RADII,
    chamfer_l1,
    chromaticity_error,
    course_normalise,
    f_score,
    mask_iou,
    mean_stderr,
    mesh_metrics,
    paired_difference,
    psnr,
    sphere_baseline,
)


def brute_force_distances(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Nearest distances by comparing every pair: the oracle for the k-d tree. -> (N,)"""
    return np.sqrt(((source[:, None, :] - target[None, :, :]) ** 2).sum(-1)).min(axis=1)


def unit_square(shift: float = 0.0) -> trimesh.Trimesh:
    """The square [0, 1]^2 at height z = shift, two triangles."""
    vertices = np.array([[0, 0, shift], [1, 0, shift], [1, 1, shift], [0, 1, shift]])
    return trimesh.Trimesh(vertices, [[0, 1, 2], [0, 2, 3]], process=False)


# ---- image metrics


def test_psnr_is_ten_log10_of_one_over_the_mean_squared_error():
    target = torch.full((4, 4, 3), 0.5)
    predicted = target.clone()
    predicted[:2] += 0.1  # half the pixels off by 0.1, half by 0.3
    predicted[2:] += 0.3
    # mse = (0.01 + 0.09) / 2 = 0.05 -> 10 log10(1 / 0.05) = 13.0103 dB
    assert float(psnr(predicted, target)) == pytest.approx(10 * math.log10(20), abs=1e-4)
    # colours above 1 are clipped first: 1.2 against 1.0 is perfect, capped at mse 1e-10
    assert float(psnr(torch.full((2, 3), 1.2), torch.ones(2, 3))) == pytest.approx(100.0)
    assert float(psnr(torch.zeros(2, 3), torch.ones(2, 3))) == pytest.approx(0.0)


def test_mask_iou_counts_strictly_above_the_threshold():
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    opacity = torch.tensor([[0.9, 0.5, 0.6, 0.1]])[..., None]  # 0.5 itself is not "on"
    # predicted on {0, 2}, true on {0, 1}: intersection 1, union 3
    assert float(mask_iou(opacity, mask)) == pytest.approx(1 / 3)
    assert float(mask_iou(torch.zeros(2, 2, 1), torch.zeros(2, 2))) == 1.0  # nothing, rightly
    assert float(mask_iou(torch.zeros(2, 2, 1), torch.ones(2, 2))) == 0.0


def test_chromaticity_error_averages_over_object_pixels_only():
    target = torch.tensor([0.6, 0.2, 0.2]).repeat(2, 2, 1)  # (2, 2, 3)
    predicted = target.clone()
    predicted[0, 0] = torch.tensor([0.2, 0.2, 0.6])  # chromaticity (.2,.2,.6) vs (.6,.2,.2): 0.8
    predicted[1, 1] = torch.tensor([0.0, 1.0, 0.0])  # off the object: ignored
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    # object pixels (0, 0) and (0, 1): errors 0.8 and 0 -> mean 0.4
    assert float(chromaticity_error(predicted, target, mask)) == pytest.approx(0.4, abs=1e-6)


# ---- point-cloud metrics


def test_chamfer_and_f_score_equal_a_brute_force_second_implementation():
    generator = np.random.default_rng(0)
    predicted, truth = generator.normal(size=(60, 3)), generator.normal(size=(45, 3)) + 0.3
    forward, backward = (
        brute_force_distances(predicted, truth),
        brute_force_distances(truth, predicted),
    )
    assert chamfer_l1(predicted, truth) == pytest.approx(0.5 * (forward.mean() + backward.mean()))
    for tau in (0.2, 0.5, 1.0):
        precision, recall = (forward < tau).mean(), (backward < tau).mean()
        expected = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        assert f_score(predicted, truth, tau) == pytest.approx(expected)


def test_f_score_counts_a_point_exactly_at_tau_as_a_miss():
    predicted = np.array([[0.0, 0, 0], [0.5, 0, 0]])  # the second point is exactly 0.5 away
    truth = np.array([[0.0, 0, 0]])
    # precision 1/2 (strictly less than 0.5), recall 1: F = 2 * 0.5 * 1 / 1.5 = 2/3, not 1
    assert f_score(predicted, truth, 0.5) == pytest.approx(2 / 3)


def test_course_normalisation_by_hand():
    points = np.array([[0.0, 0, 0], [2, 0, 0], [1, 3, 0], [1, -3, 0]])
    # centroid (1, 0, 0); centred max |coordinate| 3; divided by 2 x 3
    expected = np.array([[-1.0, 0, 0], [1, 0, 0], [0, 3, 0], [0, -3, 0]]) / 6
    np.testing.assert_allclose(course_normalise(points), expected, atol=1e-15)


def test_world_and_course_metrics_of_two_four_point_clouds_by_hand():
    truth = np.array([[-1.0, 0, 0], [1, 0, 0], [0, 3, 0], [0, -3, 0]])
    centred = np.array([[-2.0, 0, 0], [2, 0, 0], [0, 3, 0], [0, -3, 0]])
    predicted = centred + np.full(3, 5.0)  # the same cloud moved by 5 along every axis
    metrics = mesh_metrics(centred, truth)
    # world: two points 1 away in each direction -> means 0.5 and 0.5, Chamfer-L1 = their half
    assert metrics["chamfer_l1"] == pytest.approx(0.5)
    assert metrics["f@0.05"] == pytest.approx(0.5) and metrics["f@0.1"] == pytest.approx(0.5)
    # course: both clouds centred already, max |coordinate| 3 -> /6; the two moved points are
    # 1/6 away in each direction -> means 1/12 and 1/12, and the course SUMS them: 1/6
    course = mesh_metrics(predicted, truth)  # its own centring hides the offset of 5
    assert course["course_chamfer"] == pytest.approx(1 / 6)
    assert course["course_f@0.1"] == pytest.approx(0.5)  # 1/6 > 0.1: half the points miss
    assert course["course_f@0.2"] == pytest.approx(1.0) and course["course_f@0.5"] == 1.0
    assert metrics["course_chamfer"] == pytest.approx(1 / 6)  # with or without the offset
    assert course["chamfer_l1"] > 5  # while the world frame does see it


@pytest.mark.parametrize("shift, f_005", [(0.03, 1.0), (0.07, 0.0)])
def test_a_plane_shifted_along_its_normal_scores_the_shift(shift, f_005):
    """Same triangles, same seed: every sampled point has its twin exactly `shift` above."""
    metrics = mesh_metrics(unit_square(shift), unit_square(), n_points=4000)
    assert metrics["chamfer_l1"] == pytest.approx(shift, abs=1e-9)
    assert metrics["f@0.05"] == f_005 and metrics["f@0.1"] == 1.0
    # each cloud normalised by itself: identical, the shift is invisible to the course variant
    assert metrics["course_chamfer"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["course_f@0.1"] == 1.0 and not metrics["empty"]


def test_a_square_moved_sideways_by_its_own_width_is_a_known_distance():
    """A unit square next to itself (x + 1): the nearest point of the other square for
    (x, y) is (1, y) or (0, y), so both directional means are the mean of 1 - x over
    uniform x: 1/2."""
    moved = unit_square().apply_translation([1.0, 0, 0])
    metrics = mesh_metrics(moved, unit_square(), n_points=20_000)
    assert metrics["chamfer_l1"] == pytest.approx(0.5, abs=0.01)
    # within 0.05 of the shared edge: 5 % of each square's points
    assert metrics["f@0.05"] == pytest.approx(0.05, abs=0.01)


# ---- the sphere baseline


def sphere_points(radius: float, n: int = 3000) -> np.ndarray:
    """Points exactly on a sphere (not a faceted mesh), uniform in direction."""
    directions = np.random.default_rng(1).normal(size=(n, 3))
    return radius * directions / np.linalg.norm(directions, axis=1, keepdims=True)


def test_sphere_baseline_recovers_a_radius_between_grid_points():
    # 0.3937 lies between the fine grid's 0.390 and 0.395 and 0.024 from the coarse grid's
    # 0.37 and 0.42: the refinement must find it to within one step (0.005)
    baseline = sphere_baseline(sphere_points(0.3937), n_points=3000)
    assert abs(baseline["radius"] - 0.3937) <= 0.005
    assert baseline["radius"] == pytest.approx(0.395)  # the nearest grid radius
    assert baseline["f@0.05"] == 1.0


def test_sphere_baseline_equals_an_exhaustive_search_on_a_box():
    """Every grid radius from 0.3 to 0.75 scored with sphere points of our own: the
    coarse-to-fine search lands within one grid step of this exhaustive optimum."""
    box = trimesh.creation.box(extents=(0.8, 0.8, 0.8))
    truth = np.asarray(trimesh.sample.sample_surface(box, 3000, seed=0)[0])
    directions = sphere_points(1.0, 2000)

    def chamfer_of(radius: float) -> float:
        sphere = radius * directions
        forward = cKDTree(truth).query(sphere)[0].mean()
        backward = np.abs(np.linalg.norm(truth, axis=1) - radius).mean()
        return 0.5 * (forward + backward)

    radii = SPHERE_RADII[(SPHERE_RADII > 0.3) & (SPHERE_RADII < 0.75)]  # far ones score worse
    best = min(radii, key=chamfer_of)
    baseline = sphere_baseline(truth, n_points=3000)
    assert abs(baseline["radius"] - best) <= 0.0051
    assert 0.4 < best < 0.4 * math.sqrt(3)  # between the box's inscribed and circumscribed


def test_the_pruned_search_picks_what_min_picks_ties_included():
    rng = np.random.default_rng(0)
    n_scored, n_indices = 0, 0
    for _ in range(200):
        scores = rng.integers(0, 6, size=12).astype(float)  # small integers: many ties
        bounds = scores - rng.integers(0, 4, size=12)  # any bound at or below the score
        indices = range(0, 12, 1 + int(rng.integers(0, 3)))
        scored = []
        found = metrics._lowest(
            indices, lambda i, s=scores, seen=scored: seen.append(i) or s[i],
            lambda i, b=bounds: b[i],
        )  # fmt: skip
        assert found == min(indices, key=lambda i, s=scores: s[i])
        n_scored, n_indices = n_scored + len(scored), n_indices + len(indices)
    assert n_scored < n_indices  # and it skipped some


def test_the_sphere_search_equals_the_plain_search_it_replaced():
    """The search before it was pruned: min over every 10th radius, then over the 21 around."""
    box = trimesh.creation.box(extents=(0.3, 0.5, 1.2))  # far from any sphere: many far queries
    truth = np.asarray(trimesh.sample.sample_surface(box, 3000, seed=0)[0])
    unit = metrics._unit_sphere_points(3000, 0)
    tree, norms = cKDTree(truth), np.linalg.norm(truth, axis=1)

    def score(index: int) -> float:
        radius = SPHERE_RADII[index]
        return np.abs(norms - radius).mean() + tree.query(unit[:2000] * radius)[0].mean()

    coarse = min(range(0, len(SPHERE_RADII), 10), key=score)
    best = min(range(max(coarse - 10, 0), min(coarse + 11, len(SPHERE_RADII))), key=score)
    assert sphere_baseline(truth, n_points=3000)["radius"] == float(SPHERE_RADII[best])


def test_the_point_tree_gives_the_plain_trees_distances_bit_for_bit():
    rng = np.random.default_rng(0)
    points, queries = rng.normal(size=(3000, 3)), rng.normal(size=(500, 3)) * 4  # far ones too
    plain = cKDTree(points).query(queries)[0]
    assert np.array_equal(metrics.point_tree(points).query(queries)[0], plain)


# ---- paired statistics


def test_mean_stderr_by_hand_leaves_out_none_nan_and_inf():
    result = mean_stderr([1.0, None, 3.0, math.nan, 5.0, math.inf])
    # finite 1, 3, 5: mean 3, sample std 2, standard error 2 / sqrt(3)
    assert result == {"mean": 3.0, "stderr": pytest.approx(2 / math.sqrt(3)), "n": 3}
    single = mean_stderr([4.0, math.nan])
    assert single["mean"] == 4.0 and math.isnan(single["stderr"]) and single["n"] == 1
    empty = mean_stderr([None, math.nan])
    assert math.isnan(empty["mean"]) and empty["n"] == 0


def test_paired_difference_by_hand_is_other_minus_base():
    base, other = [0.1, 0.2, 0.3, 0.4], [0.3, 0.1, 0.4, 0.4]
    # differences 0.2, -0.1, 0.1, 0: mean 0.05; deviations .15, -.15, .05, -.05 -> sample
    # variance 0.05 / 3, standard error sqrt(0.05 / 3) / 2
    result = paired_difference(base, other)
    assert result["mean"] == pytest.approx(0.05) and result["n"] == 4
    assert result["stderr"] == pytest.approx(math.sqrt(0.05 / 3) / 2)
    # a NaN on either side drops that object from both: differences 1 and 3
    result = paired_difference([1.0, 2.0, math.nan, 4.0], [2.0, 5.0, 3.0, math.nan])
    assert result == {"mean": 2.0, "stderr": pytest.approx(1.0), "n": 2}
