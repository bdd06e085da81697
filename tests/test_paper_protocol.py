"""The TripoSR/SF3D evaluation protocol (utils/evaluation/paper_protocol.py): a moved copy of
the truth scores perfectly, hand-computed values on tiny clouds, and the report's columns."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import trimesh

from utils.evaluation.metrics import (
    chamfer_l1,
    mesh_metrics,
    rigid_fit,
    sample_surface,
    unit_box_normalise,
)
from utils.evaluation.paper_protocol import (
    ROTATION_STEP_DEG,
    align,
    paper_metrics,
    rotation_about_z,
)
from utils.evaluation.report import compare, markdown_report

CORNERS = np.array(list(itertools.product((-0.5, 0.5), repeat=3)))  # the unit box's corners


def l_shape() -> trimesh.Trimesh:
    """A bracket with no rotational symmetry about z, so only one turn fits."""
    foot = trimesh.creation.box(extents=(0.8, 0.3, 0.2))
    post = trimesh.creation.box(extents=(0.2, 0.2, 0.6))
    post.apply_translation((0.3, 0.0, 0.3))
    return trimesh.util.concatenate([foot, post])


def moved(mesh: trimesh.Trimesh, degrees: float, scale: float, shift) -> trimesh.Trimesh:
    """The mesh turned about z, scaled about the origin and shifted."""
    transform = np.eye(4)
    transform[:3, :3] = scale * rotation_about_z(degrees)
    transform[:3, 3] = shift
    return mesh.copy().apply_transform(transform)


def test_a_turned_scaled_and_shifted_copy_of_the_truth_scores_perfectly():
    truth_mesh = l_shape()
    copy = moved(truth_mesh, 37.0, 1.7, (0.2, -0.1, 0.3))
    # the same seed samples the same faces and barycentres: the copy's points are the truth's
    # points moved, so a perfect alignment leaves no distance at all
    truth, predicted = sample_surface(truth_mesh, 5000), sample_surface(copy, 5000)
    scores = paper_metrics(predicted, truth)
    assert scores["paper_chamfer"] < 1e-3  # the object spans 1
    assert [scores[f"paper_f@{tau}"] for tau in (0.1, 0.2, 0.5)] == [1.0, 1.0, 1.0]
    assert scores["paper_rotation_deg"] in (320.0, 330.0)  # the grid angles nearest -37°
    ours = mesh_metrics(predicted, truth)  # what the protocol hides, our frame counts
    assert ours["chamfer_l1"] > 0.1 and ours["f@0.05"] < 0.2


def test_the_rotation_search_picks_the_angle_a_plain_search_picks():
    """The search before it queried all turns at once: chamfer_l1 of each turn, the lowest."""
    truth_mesh = l_shape()
    for seed, degrees in ((0, 37.0), (1, 200.0), (2, 95.0)):
        truth = sample_surface(truth_mesh, 3000, seed=seed)
        noise = np.random.default_rng(seed).normal(scale=0.03, size=(3000, 3))
        predicted = sample_surface(moved(truth_mesh, degrees, 1.3, (0.1, 0.2, 0.0)), 3000) + noise
        normalised = unit_box_normalise(truth)
        subset, truth_subset = predicted[::3], normalised[::3]  # what align searches with

        def plain(angle: float, subset=subset, truth_subset=truth_subset) -> float:
            turned = unit_box_normalise(subset @ rotation_about_z(angle).T)
            return chamfer_l1(turned, truth_subset)

        angles = np.arange(0.0, 360.0, ROTATION_STEP_DEG)
        assert align(predicted, truth)[2] == min(angles, key=plain)


def test_unit_box_normalise_by_hand():
    points = np.array([[0.0, 0.0, 0.0], [2.0, 1.0, 0.0], [1.0, 4.0, 2.0]])
    # box (0,0,0)-(2,4,2): centre (1,2,1), longest side 4
    expected = np.array([[-0.25, -0.5, -0.25], [0.25, -0.25, -0.25], [0.0, 0.5, 0.25]])
    np.testing.assert_allclose(unit_box_normalise(points), expected)


def test_rigid_fit_recovers_a_known_pose_and_never_mirrors():
    points = np.random.default_rng(0).normal(size=(50, 3))
    rotation = rotation_about_z(30.0) @ np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0.0]])  # +x 90°
    found_rotation, found_translation = rigid_fit(points, points @ rotation.T + (1.0, 2.0, 3.0))
    np.testing.assert_allclose(found_rotation, rotation, atol=1e-10)
    np.testing.assert_allclose(found_translation, (1.0, 2.0, 3.0), atol=1e-10)
    mirrored, _ = rigid_fit(points, points * (-1.0, 1.0, 1.0))  # no rotation makes a mirror
    assert np.linalg.det(mirrored) == pytest.approx(1.0)


def test_paper_scores_of_tiny_clouds_by_hand():
    # truth: the 8 corners of the unit box. prediction, anywhere and any size: the same
    # corners plus a copy shrunk to half towards the centre. The extra points lie inside
    # the box (its normalisation is unchanged) and each is nearest to its own corner,
    # sqrt(3)/4 away; the matches are symmetric, so ICP has nothing to move.
    predicted = np.concatenate([CORNERS, CORNERS / 2]) * 3.0 + 1.0
    scores = paper_metrics(predicted, CORNERS)
    extra = math.sqrt(3) / 4  # 0.433
    assert scores["paper_chamfer"] == pytest.approx(0.5 * (8 * extra / 16 + 0.0))
    precision_within_02, recall = 8 / 16, 1.0  # the extra points are farther than 0.1 and 0.2
    f_within_02 = 2 * precision_within_02 * recall / (precision_within_02 + recall)  # 2/3
    assert scores["paper_f@0.1"] == pytest.approx(f_within_02)
    assert scores["paper_f@0.2"] == pytest.approx(f_within_02)
    assert scores["paper_f@0.5"] == 1.0
    assert scores["paper_rotation_deg"] == 0.0


def test_an_empty_prediction_scores_like_ours():
    scores = paper_metrics(np.zeros((0, 3)), CORNERS)
    assert math.isnan(scores["paper_chamfer"]) and scores["paper_f@0.1"] == 0.0


def test_the_report_shows_the_papers_columns():
    truth_mesh = l_shape()
    truth = sample_surface(truth_mesh, 3000)
    turned = sample_surface(moved(truth_mesh, 90.0, 0.5, (0.1, 0.0, 0.0)), 3000)
    ball = sample_surface(trimesh.creation.icosphere(subdivisions=4, radius=0.4), 3000)
    records = {
        "base": [{"object_id": "o0", "chamfer_l1": 0.3, **paper_metrics(turned, truth)}],
        "sphere": [{"object_id": "o0", "chamfer_l1": 0.2, **paper_metrics(ball, truth)}],
    }
    assert records["base"][0]["paper_chamfer"] < 0.01  # a moved copy of the truth
    assert records["sphere"][0]["paper_chamfer"] > 0.05  # a sphere is no bracket
    report = markdown_report(compare(records, base="base"))
    assert "paper Chamfer (lower)" in report and "paper F@0.5 (higher)" in report
    assert "hide errors of size" in report
