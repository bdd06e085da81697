"""Texture bake benchmark: time and peak memory of a bake, and whether it beats vertex colours.

    python benchmarks/bench_bake.py                        # classroom model, 1024² and 2048²
    python benchmarks/bench_bake.py --resolutions 512 --device cuda --json bake.json

The mesh (marching cubes at --mc-resolution) is extracted once and saved; each resolution is
then baked in its own process, so its peak RSS is its own: "RSS above loaded" is the peak minus
the RSS once the model, scene code and mesh are loaded. "cpu_seconds" (user + system, all
threads) says more than wall time on a shared machine; "atlas_seconds" is xatlas' share. On
CUDA, "cuda peak" is torch.cuda.max_memory_allocated during the bake.

Quality: the reference is the triplane's own colour at points on the mesh's surface. The
vertex-coloured mesh (uint8 colours at the vertices, interpolated across each face as viewers
show them) and the baked one (bilinear lookup in the uint8 texture) are compared with it at
random points uniform on the surface, and at the surface points that the centres of 256²
pixels of four turntable cameras see (trimesh ray casting).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import trimesh

from tsr import bake as bake_module
from tsr.__main__ import prepare_input
from tsr.cameras import orbit_cameras, rays_from_c2w
from tsr.io import DEFAULT_MODEL
from tsr.model import TSR

REPO = Path(__file__).resolve().parents[1]

SURFACE_POINTS = 200_000
VIEWS, VIEW_SIZE, ELEVATION_DEG = 4, 256, 20.0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def cpu_seconds() -> float:
    """User + system time of this process, all threads: less sensitive than wall time to
    other work on a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def errors(estimate: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Colours in [0, 1]: mean absolute error, RMSE, PSNR (dB), and the largest errors (the
    99.9th percentile and the maximum of a point's mean over its channels)."""
    difference = np.abs(estimate - reference)
    rmse = float(np.sqrt(np.mean(difference**2)))
    per_point = difference.mean(axis=1)
    return {
        "mae": float(difference.mean()),
        "rmse": rmse,
        "psnr": 20 * float(np.log10(1 / rmse)),
        "p99.9": float(np.percentile(per_point, 99.9)),
        "max": float(per_point.max()),
    }


def surface_points(mesh: trimesh.Trimesh, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(face index (N,), barycentric weights (N, 3)) uniform over the surface's area."""
    rng = np.random.default_rng(seed)
    face = rng.choice(len(mesh.faces), SURFACE_POINTS, p=mesh.area_faces / mesh.area)
    return face, rng.dirichlet([1.0, 1.0, 1.0], SURFACE_POINTS)


def seen_points(mesh: trimesh.Trimesh) -> tuple[np.ndarray, np.ndarray]:
    """(face index, barycentric weights) of the first surface hit of each camera pixel."""
    c2w = orbit_cameras(VIEWS, ELEVATION_DEG, 1.9)
    rays_o, rays_d = rays_from_c2w(c2w, VIEW_SIZE, VIEW_SIZE, 40.0)  # (V, H, W, 3)
    locations, _, face = mesh.ray.intersects_location(
        rays_o.reshape(-1, 3).numpy(), rays_d.reshape(-1, 3).numpy(), multiple_hits=False
    )
    weights = trimesh.triangles.points_to_barycentric(mesh.triangles[face], locations)
    return face, weights


def compare(model, scene_code, mesh, textured) -> dict[str, dict]:
    """Vertex colours and the texture against the triplane, at the same surface points."""
    texture = np.asarray(textured.visual.material.image)
    vertex_colours = mesh.visual.vertex_colors[:, :3] / 255.0
    result = {}
    for label, (face, weights) in (
        ("surface", surface_points(mesh)),
        ("views", seen_points(mesh)),
    ):
        points = np.einsum("nk,nkd->nd", weights, mesh.vertices[mesh.faces[face]])
        positions = torch.as_tensor(points, dtype=torch.float32, device=scene_code.device)
        with torch.inference_mode():
            query = model.renderer.query_triplane(model.decoder, positions, scene_code)
        reference = query["color"].float().cpu().numpy()
        by_vertex = np.einsum("nk,nkd->nd", weights, vertex_colours[mesh.faces[face]])
        uv = np.einsum("nk,nkd->nd", weights, textured.visual.uv[textured.faces[face]])
        baked = bake_module.sample_texture(texture, uv)
        result[label] = {
            "points": len(face),
            "reference_std": float(reference.std(axis=0).mean()),  # how much colour varies
            "vertex": errors(by_vertex, reference),
            "baked": errors(baked, reference),
        }
    return result


def run_case(args: argparse.Namespace) -> dict:
    """One bake in this process, from the mesh and scene code saved by the parent."""
    model = TSR.from_pretrained(args.model).to(args.device)
    saved = torch.load(args.scene, weights_only=True)
    scene_code = saved["scene_code"].to(args.device)
    mesh = trimesh.Trimesh(saved["vertices"].numpy(), saved["faces"].numpy(), process=False)
    mesh.visual.vertex_colors = saved["vertex_colors"].numpy()
    atlas_seconds = []
    uv_atlas = bake_module.uv_atlas

    def timed_atlas(*atlas_args):
        started = time.perf_counter()
        result = uv_atlas(*atlas_args)
        atlas_seconds.append(time.perf_counter() - started)
        return result

    bake_module.uv_atlas = timed_atlas
    loaded_rss = current_rss_mb()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started, started_cpu = time.perf_counter(), cpu_seconds()
    textured = bake_module.bake_texture(model, scene_code, mesh, args.case)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds, used_cpu = time.perf_counter() - started, cpu_seconds() - started_cpu
    row = {
        "resolution": args.case,
        "faces": len(mesh.faces),
        "seconds": round(seconds, 2),
        "cpu_seconds": round(used_cpu, 2),
        "atlas_seconds": round(atlas_seconds[0], 2),
        "peak_rss_mb": round(peak_rss_mb()),
        "rss_above_loaded_mb": round(peak_rss_mb() - loaded_rss),
        "cuda_peak_mb": (
            round(torch.cuda.max_memory_allocated() / 2**20)
            if args.device.startswith("cuda")
            else None
        ),
    }
    row["quality"] = compare(model, scene_code, mesh, textured)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--image", type=Path, default=REPO / "examples" / "sphere.png")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mc-resolution", type=int, default=256)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--case", type=int, help=argparse.SUPPRESS)  # internal: one bake
    parser.add_argument("--scene", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case is not None:
        print(json.dumps(run_case(args)))
        return

    model = TSR.from_pretrained(args.model).to(args.device)
    with torch.no_grad():
        scene_codes = model([prepare_input(args.image, False, 0.85)], device=args.device)
    mesh = model.extract_mesh(scene_codes, resolution=args.mc_resolution)[0]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scene = Path(scratch) / "scene.pt"
        torch.save(
            {
                "scene_code": scene_codes[0].cpu(),
                "vertices": torch.from_numpy(np.asarray(mesh.vertices)),
                "faces": torch.from_numpy(np.asarray(mesh.faces)),
                "vertex_colors": torch.from_numpy(np.asarray(mesh.visual.vertex_colors)),
            },
            scene,
        )
        for resolution in args.resolutions:
            done = subprocess.run(
                [sys.executable, __file__, "--case", str(resolution), "--scene", str(scene),
                 "--model", args.model, "--device", args.device],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    for row in rows:
        quality = row.pop("quality")
        print(json.dumps(row))
        for label, numbers in quality.items():
            for kind in ("vertex", "baked"):
                shown = ", ".join(f"{k} {v:.4f}" for k, v in numbers[kind].items())
                print(
                    f"  {label:8s} ({numbers['points']} points, colour std "
                    f"{numbers['reference_std']:.3f}) {kind:6s}: {shown}"
                )
        row["quality"] = quality
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
