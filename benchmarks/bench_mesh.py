"""Model benchmark: forward, one render and mesh extraction, ours beside TripoSR's way.

Each case runs in its own process so its peak RSS is its own. "RSS above weights" is the
peak minus the RSS right after the model was loaded. The baseline ("official") builds the
whole R^3 x 3 grid of coordinates, queries it in 8192-point chunks, concatenates the results
and runs marching cubes, as TripoSR's extract_mesh does.

    python benchmarks/bench_mesh.py                      # tiny model, 128/256/512
    python benchmarks/bench_mesh.py --full --resolutions 128 256   # full-size random init
    python benchmarks/bench_mesh.py --full --device cuda           # on a GPU: + CUDA peak

On CUDA, times include the copy of the volume to the CPU for marching cubes, and "cuda peak"
is torch.cuda.max_memory_allocated over the case (the forward pass included).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch

CASES = ("forward", "render128", "official", "dense", "coarse_to_fine", "blocks")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def load_model(full: bool, device: str = "cpu"):
    from tsr import TSR

    model = TSR.from_config("official", seed=0) if full else TSR.from_pretrained("tiny")
    return model.to(device)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def official_style_extraction(model, scene_code, resolution: int, threshold: float) -> int:
    """TripoSR's extract_mesh: whole coordinate grid, 8192-point chunks, cat, marching cubes."""
    import mcubes

    radius = model.config.renderer.radius
    axis = torch.linspace(0, 1, resolution, device=scene_code.device)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    grid = grid * (2 * radius) - radius  # (R^3, 3)
    model.renderer.set_chunk_size(8192)
    density = model.renderer.query_triplane(model.decoder, grid, scene_code)["density_act"]
    volume = (density.reshape(resolution, resolution, resolution) - threshold).cpu().numpy()
    _verts, faces = mcubes.marching_cubes(volume, 0.0)
    return len(faces)


def run_case(
    case: str, full: bool, resolution: int, threshold: float | None, device: str = "cpu"
) -> dict:
    torch.set_num_threads(psutil.cpu_count(logical=False) or 2)
    model = load_model(full, device)
    image = np.zeros((256, 256, 3), np.uint8)
    image[64:192, 64:192] = (200, 120, 40)  # a square on black: content does not matter here
    with torch.no_grad():
        scene_codes = model([image])
    rss_weights = psutil.Process().memory_info().rss / 2**20
    synchronize(device)
    start = time.perf_counter()
    faces = queries = None
    with torch.no_grad():
        if case == "forward":
            model([image])
        elif case == "render128":
            model.render(scene_codes, n_views=1, height=128, width=128)
        elif case == "official":
            faces = official_style_extraction(model, scene_codes[0], resolution, threshold)
            queries = resolution**3
        else:
            from tsr import mesh as mesh_extraction

            def density(points, code=scene_codes[0]):
                return model.renderer.query_triplane(model.decoder, points, code)["density_act"][
                    :, 0
                ]

            result = mesh_extraction.extract_isosurface(
                density, resolution=resolution, threshold=threshold, method=case, device=device
            )
            faces, queries = len(result.faces), result.n_queries
    synchronize(device)
    seconds = time.perf_counter() - start
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else 0
    return {
        "case": case,
        "model": "full" if full else "tiny",
        "device": device,
        "resolution": resolution if case not in ("forward", "render128") else None,
        "seconds": round(seconds, 3),
        "points_per_s": round(queries / seconds) if queries else None,
        "queries": queries,
        "faces": faces,
        "peak_rss_mb": round(peak_rss_mb()),
        "rss_after_weights_mb": round(rss_weights),
        "peak_above_weights_mb": round(peak_rss_mb() - rss_weights),
        "cuda_peak_mb": round(cuda_peak),
    }


def quantile_threshold(full: bool) -> float:
    """The 0.9-quantile of density on a 32^3 grid: random weights never reach 25."""
    model = load_model(full)
    with torch.no_grad():
        code = model([np.zeros((64, 64, 3), np.uint8)])[0]
        axis = torch.linspace(-0.87, 0.87, 32)
        grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
        density = model.renderer.query_triplane(model.decoder, grid, code)["density_act"]
    return float(density.quantile(0.9))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="full-size config, random init")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--skip-official-above", type=int, default=256, help="baseline's max R")
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu or cuda")
    parser.add_argument("--json", type=Path, default=Path("outputs/bench_mesh.json"))
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--resolution", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--threshold", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # child process: one case, JSON on stdout
        print(
            json.dumps(run_case(args.case, args.full, args.resolution, args.threshold, args.device))
        )
        return

    threshold = quantile_threshold(args.full)
    jobs = [(case, 0) for case in ("forward", "render128") if case in args.cases]
    for resolution in args.resolutions:
        for case in args.cases:
            if case in ("forward", "render128"):
                continue
            if case == "official" and resolution > args.skip_official_above:
                continue
            jobs.append((case, resolution))
    rows = []
    for case, resolution in jobs:
        command = [sys.executable, __file__, "--case", case, "--resolution", str(resolution)]
        command += ["--threshold", str(threshold), "--device", args.device]
        command += ["--full"] if args.full else []
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            rows.append({"case": case, "resolution": resolution, "error": done.stderr[-300:]})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(_format_row(rows[-1]), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"threshold": threshold, "rows": rows}, indent=2))
    print(f"wrote {args.json}")


def _format_row(row: dict) -> str:
    if "error" in row:
        return f"{row['case']:>15} R={row['resolution']}: FAILED {row['error']}"
    pps = f"{row['points_per_s'] / 1e6:6.2f} M pts/s" if row["points_per_s"] else " " * 14
    return (
        f"{row['model']:>4} {row['case']:>15} R={row['resolution'] or '-':>4} "
        f"{row['seconds']:8.2f} s {pps} queries={row['queries'] or '-':>10} "
        f"peak={row['peak_rss_mb']:6d} MB (+{row['peak_above_weights_mb']} MB over weights)"
        + (f" cuda peak={row['cuda_peak_mb']} MB" if row["device"] != "cpu" else "")
    )


if __name__ == "__main__":
    main()
