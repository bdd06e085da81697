"""Mesh and image metrics on shapes whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import trimesh

from utils.evaluation.metrics import (
    chamfer_and_f_scores,
    chamfer_l1,
    chromaticity_error,
    course_normalise,
    f_score,
    mask_iou,
    mesh_metrics,
    paired_difference,
    psnr,
    sample_surface,
    sphere_baseline,
)


def sphere(radius: float, centre=(0.0, 0.0, 0.0)) -> trimesh.Trimesh:
    mesh = trimesh.creation.icosphere(subdivisions=4, radius=radius)
    return mesh.apply_translation(centre)


def test_hand_computed_chamfer_and_f_score():
    predicted = np.array([[0.0, 0, 0]])
    truth = np.array([[0.0, 0, 1], [0.0, 0, 3]])
    # predicted -> truth: 1; truth -> predicted: (1 + 3) / 2 = 2; half their sum
    assert chamfer_l1(predicted, truth) == pytest.approx(1.5)
    # precision 1/2 (one of two predicted points near truth), recall 1 -> F = 2/3
    assert f_score(np.array([[0.0, 0, 0], [1, 0, 0]]), np.array([[0.0, 0, 0]]), 0.5) == (
        pytest.approx(2 / 3)
    )
    assert math.isnan(chamfer_l1(np.zeros((0, 3)), truth))


def test_one_query_pair_gives_chamfer_and_every_f_score_exactly():
    rng = np.random.default_rng(0)
    predicted, truth = rng.normal(size=(300, 3)), rng.normal(size=(200, 3)) + 0.1
    chamfer, f_scores = chamfer_and_f_scores(predicted, truth, (0.1, 0.2, 0.5))
    assert chamfer == chamfer_l1(predicted, truth)  # bit for bit, not approximately
    assert f_scores == {tau: f_score(predicted, truth, tau) for tau in (0.1, 0.2, 0.5)}
    assert len(set(f_scores.values())) == 3  # three different taus, three different scores


def test_sampling_is_reproducible_and_on_the_surface():
    mesh = sphere(0.5)
    first, second = sample_surface(mesh, 2000, seed=3), sample_surface(mesh, 2000, seed=3)
    assert first.shape == (2000, 3) and np.array_equal(first, second)
    assert np.allclose(np.linalg.norm(first, axis=1), 0.5, atol=0.005)  # icosphere facets
    # (a mesh against a shifted copy of itself: tests/test_oracles_metrics.py)


def test_world_frame_sees_scale_and_offset_errors_the_course_variant_hides():
    truth = sphere(0.5)
    bigger = mesh_metrics(sphere(0.65), truth)
    # concentric spheres 0.15 apart: every nearest distance is about 0.15 in both directions
    assert 0.149 < bigger["chamfer_l1"] < 0.16  # (facets sit slightly inside the sphere)
    assert bigger["f@0.05"] == 0 and bigger["f@0.1"] == 0
    shifted = mesh_metrics(sphere(0.5, centre=(0.3, 0, 0)), truth)
    assert shifted["chamfer_l1"] > 0.1 and shifted["f@0.05"] < 0.5
    for wrong in (bigger, shifted):  # each cloud normalised by itself: both look perfect
        assert wrong["course_chamfer"] < 0.02 and wrong["course_f@0.1"] > 0.99


def test_course_normalisation_matches_its_definition():
    points = np.random.default_rng(0).normal(size=(500, 3)) * [1.0, 2.0, 0.5] + 7.0
    normalised = course_normalise(points)
    assert np.allclose(normalised.mean(axis=0), 0, atol=1e-12)
    assert np.abs(normalised).max() == pytest.approx(0.5)


def test_empty_prediction_is_recorded_not_crashed():
    metrics = mesh_metrics(trimesh.Trimesh(), sphere(0.5))
    assert metrics["empty"] and math.isnan(metrics["chamfer_l1"])
    assert metrics["f@0.1"] == 0 and metrics["course_f@0.5"] == 0
    with pytest.raises(ValueError, match="ground-truth mesh is empty"):
        mesh_metrics(sphere(0.5), trimesh.Trimesh())


def test_sphere_baseline_finds_the_radius_of_a_sphere_mesh():
    baseline = sphere_baseline(sphere(0.4), n_points=3000)
    # within one step of the radius grid (0.005); facets sit just inside the sphere
    assert abs(baseline["radius"] - 0.4) <= 0.005
    assert baseline["f@0.05"] > 0.99
    # (an off-grid radius and a box against an exhaustive search: tests/test_oracles_metrics.py)


def test_paired_difference_uses_complete_pairs():
    result = paired_difference([1.0, 2.0, 3.0, math.nan], [2.0, 2.0, 5.0, 1.0])
    # differences 1, 0, 2: mean 1, sample std 1, stderr 1/sqrt(3)
    assert result == {"mean": 1.0, "stderr": pytest.approx(1 / math.sqrt(3)), "n": 3}
    assert math.isnan(paired_difference([1.0], [2.0])["stderr"])
    with pytest.raises(ValueError, match="one per object"):
        paired_difference([1.0, 2.0], [1.0])


def test_image_metrics():
    target = torch.full((8, 8, 3), 0.5)
    assert float(psnr(target + 0.1, target)) == pytest.approx(20.0, abs=1e-3)  # mse 0.01
    mask = torch.zeros(8, 8)
    mask[:4] = 1  # top half
    opacity = torch.zeros(8, 8, 1)
    opacity[:, :4] = 0.9  # left half: the overlap is a quarter, the union three quarters
    assert float(mask_iou(opacity, mask)) == pytest.approx(1 / 3)


def test_chromaticity_error_sees_hue_not_brightness():
    red = torch.tensor([0.8, 0.2, 0.2]).expand(8, 8, 3)
    mask = torch.zeros(8, 8)
    mask[2:6, 2:6] = 1
    assert float(chromaticity_error(0.5 * red, red, mask)) == pytest.approx(0.0, abs=1e-6)
    grey = torch.full((8, 8, 3), 0.4)
    # red's chromaticity is (2/3, 1/6, 1/6), grey's (1/3, 1/3, 1/3): L1 distance 2/3
    assert float(chromaticity_error(grey, red, mask)) == pytest.approx(2 / 3, abs=1e-5)
    wrong_outside = red.clone()
    wrong_outside[0] = torch.tensor([0.0, 0.0, 1.0])  # off the object: not counted
    assert float(chromaticity_error(wrong_outside, red, mask)) == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(float(chromaticity_error(grey, red, torch.zeros(8, 8))))


def test_mesh_metrics_match_brute_force_distances():
    """Every distance metric from one nearest-neighbour query each way equals the definitions
    computed from the full distance matrix."""
    rng = np.random.default_rng(0)
    predicted, truth = rng.normal(size=(300, 3)) * 0.3, rng.normal(size=(200, 3)) * 0.3 + 0.05

    def brute(p: np.ndarray, g: np.ndarray, taus) -> tuple[float, list[float]]:
        distances = np.linalg.norm(p[:, None] - g[None], axis=-1)  # (P, G)
        to_g, to_p = distances.min(1), distances.min(0)
        scores = []
        for tau in taus:
            precision, recall = (to_g < tau).mean(), (to_p < tau).mean()
            scores.append(2 * precision * recall / (precision + recall))
        return 0.5 * (to_g.mean() + to_p.mean()), scores

    metrics = mesh_metrics(predicted, truth)
    chamfer, scores = brute(predicted, truth, (0.05, 0.1))
    assert metrics["chamfer_l1"] == pytest.approx(chamfer, rel=1e-12)
    assert [metrics["f@0.05"], metrics["f@0.1"]] == pytest.approx(scores, rel=1e-12)
    chamfer, scores = brute(course_normalise(predicted), course_normalise(truth), (0.1, 0.2, 0.5))
    assert metrics["course_chamfer"] == pytest.approx(2 * chamfer, rel=1e-12)
    course = [metrics[f"course_f@{tau:g}"] for tau in (0.1, 0.2, 0.5)]
    assert course == pytest.approx(scores, rel=1e-12)
