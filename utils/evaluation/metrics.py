"""How good is a reconstruction: mesh distances, image scores, and honest comparisons.

Mesh metrics compare 10,000 points sampled uniformly on each surface (fixed seed), with
d(p, Q) = the Euclidean (L2) distance from point p to its nearest neighbour in cloud Q:

- Chamfer-L1 (ours) = ½ · (mean_{p∈P} d(p, G) + mean_{g∈G} d(g, P)), P predicted, G ground truth.
  "L1" because distances are not squared (Occupancy Networks' convention); lower is better.
- F-score@τ = 2·precision·recall / (precision + recall), precision = share of P within τ of G,
  recall = share of G within τ of P (strictly less than τ).
- Both in the SHARED WORLD FRAME: prediction and ground truth are already in TripoSR's world
  (the object inside [-0.87, 0.87]³, scaled to fill 0.85 of view 0), so a mesh that is too
  big, too small or shifted scores worse, as it should.
- The course project's variant ("course_*"): each cloud is centred on its own centroid and
  divided by twice its own largest |coordinate| (so it spans about [-0.5, 0.5]); Chamfer is
  the SUM of the two directional means (twice ours); F at τ = 0.1, 0.2, 0.5. Because each cloud
  is normalised by itself, errors of scale and position are invisible to it: we report it
  beside ours for comparison with that project, never instead of ours.

An empty predicted mesh has no surface to sample: its Chamfer values are NaN, its F-scores 0
and its record says `empty`; paired statistics count only objects where both values are finite.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import trimesh
from scipy.spatial import cKDTree

__all__ = [
    "COURSE_THRESHOLDS",
    "F_THRESHOLDS",
    "N_SURFACE_POINTS",
    "chamfer_and_f_scores",
    "chamfer_from_distances",
    "chamfer_l1",
    "chromaticity_error",
    "course_normalise",
    "f_score",
    "mask_iou",
    "mesh_metrics",
    "nearest_distances",
    "paired_difference",
    "point_tree",
    "psnr",
    "rigid_fit",
    "sample_surface",
    "sphere_baseline",
    "unit_box_normalise",
]

N_SURFACE_POINTS = 10_000
F_THRESHOLDS = (0.05, 0.1)  # ours, in world units (the object spans about 1.5)
COURSE_THRESHOLDS = (0.1, 0.2, 0.5)  # the course project's, on self-normalised clouds
PARALLEL_QUERY_POINTS = 5000  # nearest-neighbour queries this large run on every core
# Sphere radii the baseline searches: every 0.005 up to the bounding cube's half size.
SPHERE_RADII = np.arange(0.02, 0.8701, 0.005)


def sample_surface(
    mesh: trimesh.Trimesh, n_points: int = N_SURFACE_POINTS, seed: int = 0
) -> np.ndarray:
    """Points uniformly on the surface (area-weighted), reproducible. -> (n, 3), (0, 3) if empty"""
    if len(mesh.faces) == 0 or mesh.area <= 0:
        return np.zeros((0, 3))
    points, _ = trimesh.sample.sample_surface(mesh, n_points, seed=seed)
    return np.asarray(points, dtype=np.float64)


def point_tree(points: np.ndarray) -> cKDTree:
    """A k-d tree over (N, 3) points for exact nearest-neighbour queries. Cut at the midpoint
    of each cell's own extent (compact_nodes) rather than of its points' bounds, and not at
    medians (balanced_tree): the distances are the same, and queries far from the points, as
    the sphere baseline's are, run about twice as fast."""
    return cKDTree(points, compact_nodes=False, balanced_tree=False)


def nearest_distances(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """L2 distance from each source point to its nearest target point. (N,3), (M,3) -> (N,)"""
    # exact, on every core for a large query; starting the threads costs more than a query of
    # the papers' rotation search (1,000 points) takes, 72 of them per object and model
    workers = -1 if len(source) >= PARALLEL_QUERY_POINTS else 1
    return point_tree(target).query(source, k=1, workers=workers)[0]


def chamfer_and_f_scores(
    predicted: np.ndarray, truth: np.ndarray, taus: Sequence[float]
) -> tuple[float, dict[float, float]]:
    """Chamfer-L1 and the F-score at each tau from one nearest-neighbour query each way
    (NaN and 0 if a cloud is empty): the same numbers as chamfer_l1 and f_score, at a quarter
    of their cost for three taus. -> (chamfer, {tau: F})"""
    if len(predicted) == 0 or len(truth) == 0:
        return math.nan, dict.fromkeys(taus, 0.0)
    to_truth = nearest_distances(predicted, truth)  # (N,)
    to_predicted = nearest_distances(truth, predicted)  # (M,)
    f_scores = {}
    for tau in taus:
        precision, recall = float((to_truth < tau).mean()), float((to_predicted < tau).mean())
        total = precision + recall
        f_scores[tau] = 0.0 if total == 0 else 2 * precision * recall / total
    return chamfer_from_distances(to_truth, to_predicted), f_scores


def chamfer_from_distances(to_truth: np.ndarray, to_predicted: np.ndarray) -> float:
    """Chamfer-L1 from each direction's nearest distances: ½ (mean d(p, G) + mean d(g, P))."""
    return 0.5 * float(to_truth.mean() + to_predicted.mean())


def chamfer_l1(predicted: np.ndarray, truth: np.ndarray) -> float:
    """½ (mean nearest distance predicted→truth + truth→predicted); NaN if a cloud is empty."""
    return chamfer_and_f_scores(predicted, truth, ())[0]


def f_score(predicted: np.ndarray, truth: np.ndarray, tau: float) -> float:
    """Harmonic mean of precision and recall at distance tau; 0 if a cloud is empty."""
    return chamfer_and_f_scores(predicted, truth, (tau,))[1][tau]


def course_normalise(points: np.ndarray) -> np.ndarray:
    """The course project's normalisation: minus the centroid, over twice the max |coordinate|."""
    centred = points - points.mean(axis=0, keepdims=True)
    return centred / (2 * max(float(np.abs(centred).max()), 1e-6))


def unit_box_normalise(points: np.ndarray) -> np.ndarray:
    """Centre a cloud on its bounding-box centre and scale its longest side to 1, so that it
    fits [-0.5, 0.5]³ (the unit bounding box the TripoSR and SF3D evaluations scale to).
    (N, 3) -> (N, 3)"""
    low, high = points.min(axis=0), points.max(axis=0)
    return (points - (low + high) / 2) / max(float((high - low).max()), 1e-9)


def rigid_fit(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rotation R and translation t minimising sum |R p + t - q|² over paired points
    (Kabsch: the SVD of the centred cross-covariance, with a reflection ruled out).
    (N, 3), (N, 3) -> R (3, 3), t (3,)"""
    source_mean, target_mean = source.mean(axis=0), target.mean(axis=0)
    covariance = (source - source_mean).T @ (target - target_mean)  # (3, 3)
    u, _, vt = np.linalg.svd(covariance)
    flip = np.diag([1.0, 1.0, np.sign(np.linalg.det(vt.T @ u.T))])  # det R = +1, no mirror
    rotation = vt.T @ flip @ u.T
    return rotation, target_mean - rotation @ source_mean


def _cloud_metrics(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    chamfer, f_scores = chamfer_and_f_scores(predicted, truth, F_THRESHOLDS)
    metrics = {"chamfer_l1": chamfer, **{f"f@{tau:g}": f for tau, f in f_scores.items()}}
    if len(predicted) and len(truth):
        predicted, truth = course_normalise(predicted), course_normalise(truth)
    chamfer, f_scores = chamfer_and_f_scores(predicted, truth, COURSE_THRESHOLDS)
    metrics["course_chamfer"] = 2 * chamfer  # theirs sums the two directions
    return metrics | {f"course_f@{tau:g}": f for tau, f in f_scores.items()}


def mesh_metrics(
    predicted: trimesh.Trimesh | np.ndarray,
    truth: trimesh.Trimesh | np.ndarray,
    n_points: int = N_SURFACE_POINTS,
    seed: int = 0,
) -> dict[str, float | bool]:
    """Chamfer-L1, F@0.05/0.1 (world frame) and the course variant for one object.

    Meshes are sampled with `seed`; (N, 3) arrays are used as given (e.g. ground-truth points
    sampled once for several predictions).
    """
    clouds = [
        sample_surface(m, n_points, seed) if isinstance(m, trimesh.Trimesh) else np.asarray(m)
        for m in (predicted, truth)
    ]
    if len(clouds[1]) == 0:
        raise ValueError("the ground-truth mesh is empty: there is nothing to compare against")
    return {**_cloud_metrics(*clouds), "empty": len(clouds[0]) == 0}


def sphere_baseline(
    truth: trimesh.Trimesh | np.ndarray,
    n_points: int = N_SURFACE_POINTS,
    seed: int = 0,
    radii: Sequence[float] = SPHERE_RADII,
) -> dict[str, float | bool]:
    """The best single sphere centred at the origin: the radius with the lowest Chamfer-L1 to
    the ground truth, scored like any model. A model must beat it to show it learnt a shape.

    The search scores every 10th radius of `radii`, then every radius around the best, with
    2,000 sphere points (the final score uses n_points). -> mesh_metrics of it plus "radius".
    """
    truth_points = (
        sample_surface(truth, n_points, seed) if isinstance(truth, trimesh.Trimesh) else truth
    )
    unit = _unit_sphere_points(n_points, seed)  # (n, 3)
    norms = np.linalg.norm(truth_points, axis=1)
    truth_tree = point_tree(truth_points)

    def truth_to_sphere(index: int) -> float:  # exact for a sphere at the origin: | |g| - r |
        return np.abs(norms - radii[index]).mean()

    @functools.cache  # the fine search starts from radii the coarse one scored
    def score(index: int) -> float:
        sphere_to_truth = truth_tree.query(unit[:2000] * radii[index])[0].mean()
        return truth_to_sphere(index) + sphere_to_truth

    coarse = _lowest(range(0, len(radii), 10), score, truth_to_sphere)
    best = _lowest(range(max(coarse - 10, 0), min(coarse + 11, len(radii))), score, truth_to_sphere)
    radius = float(radii[best])
    return {**mesh_metrics(unit * radius, truth_points), "radius": radius}


@functools.cache
def _unit_sphere_points(n_points: int, seed: int) -> np.ndarray:
    """n_points spread over the unit sphere (sampled on an icosphere, pushed out onto the
    sphere), made once per size and seed: the same for every object. -> (n, 3), read-only"""
    unit = sample_surface(trimesh.creation.icosphere(subdivisions=5), n_points, seed)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    unit.flags.writeable = False
    return unit


def _lowest(
    indices: Iterable[int], score: Callable[[int], float], lower_bound: Callable[[int], float]
) -> int:
    """min(indices, key=score), the first index on a tie as min gives, without scoring the
    indices whose cheap lower bound of the score is already above the best score found.

    The sphere search spends most of its time on radii far from the object (a nearest-
    neighbour query is slowest far from the points), and those are the ones the bound rules
    out. Exact in floating point: a score is its bound plus a distance >= 0, never below it.
    """
    best, best_score = -1, math.inf
    for index in sorted(indices, key=lower_bound):
        if lower_bound(index) > best_score:  # sorted: no later index can do better either
            break
        value = score(index)
        if value < best_score or (value == best_score and index < best):
            best, best_score = index, value
    return best


def paired_difference(base: Sequence[float], other: Sequence[float]) -> dict[str, float | int]:
    """Per-object differences other - base over objects where both are finite.

    -> mean, stderr (sample std / sqrt(n); NaN for n < 2), n. A mean more than 2 standard
    errors from zero is unlikely to be noise across objects.
    """
    a, b = np.asarray(base, dtype=np.float64), np.asarray(other, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need one per object in both lists: {a.shape} vs {b.shape}")
    return mean_stderr((b - a)[np.isfinite(a) & np.isfinite(b)])


def mean_stderr(values: Sequence[float | None]) -> dict[str, float | int]:
    """Mean and standard error of the mean (sample std / sqrt(n); NaN for n < 2) over the
    finite values; None and NaN are left out. -> mean, stderr, n"""
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n = len(finite)
    return {
        "mean": float(finite.mean()) if n else math.nan,
        "stderr": float(finite.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
        "n": n,
    }


def psnr(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB for colours in [0, 1]. (..., 3), (..., 3) -> ()"""
    mse = F.mse_loss(predicted.float().clamp(0, 1), target.float())
    return -10.0 * torch.log10(mse.clamp(min=1e-10))


def mask_iou(opacity: torch.Tensor, mask: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Intersection over union of rendered opacity and target mask, both thresholded. -> ()"""
    predicted, target = opacity.squeeze(-1) > threshold, mask > threshold
    union = (predicted | target).sum()
    # an empty prediction of an empty target is a perfect match
    return (predicted & target).sum() / union if union > 0 else opacity.new_tensor(1.0)


def chromaticity_error(
    predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, threshold: float = 0.5
) -> torch.Tensor:
    """Colour without brightness: mean L1 distance between rgb / (r + g + b) of the predicted
    and the true colours, on the true object's pixels. (..., 3), (..., 3), (...) -> ()

    PSNR mixes colour with shape and shading; this says whether the hue is right. 0 is the
    right hue; plain grey scores ~0.27 on the saturated primitives. NaN without object pixels.
    """
    on_object = mask > threshold
    if not on_object.any():
        return predicted.new_tensor(math.nan)

    def chromaticity(rgb: torch.Tensor) -> torch.Tensor:
        rgb = rgb[on_object].float().clamp(0, 1)  # (N, 3)
        return rgb / rgb.sum(-1, keepdim=True).clamp(min=1e-3)

    return (chromaticity(predicted) - chromaticity(target)).abs().sum(-1).mean()
