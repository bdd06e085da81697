"""Model benchmark: mesh extraction (and a forward pass and a render), ours beside TripoSR's.

One table: for the classroom model (shipped, trained) and the full-size model (official config,
random weights), each extraction case at each resolution, with its time, density queries,
faces, peak RSS and how far its mesh is from the dense one. Cases:
  official        TripoSR's extract_mesh loop: the whole R^3 x 3 coordinate grid built first,
                  queried in 8192-point chunks, concatenated, then PyMCubes.
  dense           ours, every grid point (one volume, or blocks above 406^3).
  coarse_to_fine  ours, a grid 4x coarser, then every point near its sign changes: fast, but
                  blind to parts that pass between coarse samples.
  auto            the default of `TSR.extract_mesh`: a band around the surface, margins
                  measured to give the dense mesh (tsr/model.py), or dense where the band
                  would not be one.
  blocks          ours, every point, in 128^3 blocks (not run unless asked).
  forward, render128: the image-to-triplane pass and one 128^2 view.
Each case runs in its own process, so its peak RSS is its own; "over weights" is the peak
less the RSS right after the model was loaded.

    python benchmarks/bench_mesh.py --quick        # ~200 CPU s: minutes on 2 idle cores
    python benchmarks/bench_mesh.py                # 128/256/512, both models: ~2,500 CPU s
    python benchmarks/bench_mesh.py --models full --resolutions 256 --cases official auto
    python benchmarks/bench_mesh.py --full --device cuda   # full-size model on a GPU

On CUDA, times include the copy of the mesh to the CPU, and "cuda peak" is
torch.cuda.max_memory_allocated over the case (the forward pass included). "cpu s" is the
case's CPU time (all threads): on a busy shared machine, cpu s / threads estimates the wall
time on idle cores better than the wall time does (run with OMP_WAIT_POLICY=PASSIVE there, or
OpenMP's spinning threads make every case many times slower).
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
import psutil
import torch
from PIL import Image
from scipy.spatial import cKDTree

ROOT = Path(__file__).resolve().parent.parent
EXTRACTIONS = ("official", "dense", "coarse_to_fine", "auto", "blocks")
CASES = ("forward", "render128", *EXTRACTIONS)
DEFAULT_CASES = ("forward", "render128", "official", "dense", "coarse_to_fine", "auto")
MODELS = ("classroom", "full")
# The full-size model is built once (a random init of 419M parameters takes ~40 s on 2
# cores) and saved here, so each case's process only loads it.
FULL_MODEL_CACHE = ROOT / "outputs" / "bench_cache" / "official-seed0"


def _cpu_seconds() -> float:
    """CPU time of this process (all threads). On a shared machine wall time grows with the
    other processes' load; CPU time / threads is closer to what idle cores would take."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def load_model(name: str, device: str = "cpu"):
    from tsr import TSR

    if name == "classroom":
        return TSR.from_pretrained("classroom").to(device)
    if not (FULL_MODEL_CACHE / "config.yaml").is_file():
        TSR.from_config("official", seed=0).save_pretrained(FULL_MODEL_CACHE)
    return TSR.from_pretrained(FULL_MODEL_CACHE).to(device)


def input_image(name: str) -> np.ndarray:
    """The classroom model gets an object it was trained on; random weights see a square."""
    if name == "classroom":
        return np.asarray(Image.open(ROOT / "examples" / "sphere.png").convert("RGB"))
    image = np.zeros((256, 256, 3), np.uint8)
    image[64:192, 64:192] = (200, 120, 40)
    return image


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def official_style_extraction(model, scene_code, resolution: int, threshold: float):
    """TripoSR's extract_mesh: whole coordinate grid, 8192-point chunks, cat, marching cubes."""
    import mcubes

    radius = model.config.renderer.radius
    axis = torch.linspace(0, 1, resolution, device=scene_code.device)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    grid = grid * (2 * radius) - radius  # (R^3, 3)
    model.renderer.set_chunk_size(8192)
    density = model.renderer.query_triplane(model.decoder, grid, scene_code)["density_act"]
    volume = (density.reshape(resolution, resolution, resolution) - threshold).cpu().numpy()
    verts, faces = mcubes.marching_cubes(volume, 0.0)
    world = torch.from_numpy(verts).float() / (resolution - 1.0) * (2 * radius) + -radius
    return world.numpy(), faces


def run_case(args) -> dict:
    """Child process: one case; saves the mesh's vertices, returns a row."""
    torch.set_num_threads(psutil.cpu_count(logical=False) or 2)
    model = load_model(args.model, args.device)
    image = input_image(args.model)
    with torch.no_grad():
        scene_codes = model([image])
    rss_weights = psutil.Process().memory_info().rss / 2**20
    synchronize(args.device)
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    verts = faces = None
    queries, method = None, args.case
    with torch.no_grad():
        if args.case == "forward":
            model([image])
        elif args.case == "render128":
            model.render(scene_codes, n_views=1, height=128, width=128)
        elif args.case == "official":
            verts, faces = official_style_extraction(
                model, scene_codes[0], args.resolution, args.threshold
            )
            queries = args.resolution**3
        else:
            from tsr import mesh as mesh_extraction
            from tsr.model import surface_band

            def density(points, code=scene_codes[0]):
                decoded = model.renderer.query_triplane(model.decoder, points, code)
                return decoded["density_act"][:, 0]

            result = mesh_extraction.extract_isosurface(
                density,
                resolution=args.resolution,
                threshold=args.threshold,
                radius=model.config.renderer.radius,
                device=args.device,
                **surface_band(args.resolution, scene_codes.shape[-1], args.threshold, args.case),
            )
            verts, faces, queries, method = (
                result.verts,
                result.faces,
                result.n_queries,
                result.method,
            )
    synchronize(args.device)
    seconds, cpu_seconds = time.perf_counter() - start, _cpu_seconds() - cpu_start
    if verts is not None:
        np.save(args.save_verts, verts)
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else 0
    return {
        "model": args.model,
        "case": args.case,
        "method": method,
        "device": args.device,
        "resolution": args.resolution if verts is not None else None,
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu_seconds, 3),
        "queries": queries,
        "faces": None if faces is None else len(faces),
        "peak_rss_mb": round(peak_rss_mb()),
        "peak_above_weights_mb": round(peak_rss_mb() - rss_weights),
        "cuda_peak_mb": round(cuda_peak),
    }


def threshold_of(name: str) -> float:
    """The classroom model's own level; random weights never reach 25, so the full-size model
    is cut at the 0.9-quantile of its density on a 32^3 grid."""
    model = load_model(name)
    if name == "classroom":
        return model.config.mc_threshold
    with torch.no_grad():
        code = model([input_image(name)])[0]
        axis = torch.linspace(-0.87, 0.87, 32)
        grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
        density = model.renderer.query_triplane(model.decoder, grid, code)["density_act"]
    return float(density.quantile(0.9))


def distance_to_dense(row: dict, rows: list[dict], verts_of: dict) -> str:
    """'same' when the vertex arrays are identical, else the Hausdorff distance in voxels."""
    dense = [
        r
        for r in rows
        if r.get("case") == "dense"
        and (r["model"], r["resolution"]) == (row["model"], row["resolution"])
    ]
    if not dense or row is dense[0] or id(row) not in verts_of or id(dense[0]) not in verts_of:
        return "-"
    a, b = np.load(verts_of[id(row)]), np.load(verts_of[id(dense[0])])
    if a.shape == b.shape and np.array_equal(a, b):
        return "same"
    if len(a) == 0 or len(b) == 0:
        return "empty" if len(a) != len(b) else "same"
    hausdorff = max(cKDTree(b).query(a)[0].max(), cKDTree(a).query(b)[0].max())
    return f"{hausdorff / (2 * 0.87 / (row['resolution'] - 1)):.3g} vox"


def print_table(rows: list[dict], verts_of: dict) -> None:
    header = (
        f"{'model':>9} {'case':>15} {'method':>15} {'R':>5} {'seconds':>9} {'cpu s':>8} {'queries':>11} "
        f"{'faces':>8} {'peak RSS':>9} {'over wts':>9} {'vs dense':>10}"
    )
    print(header)
    for row in rows:
        if "error" in row:
            print(
                f"{row['model']:>9} {row['case']:>15} R={row['resolution']}: FAILED {row['error']}"
            )
            continue
        cuda = f" cuda peak {row['cuda_peak_mb']} MB" if row["device"] != "cpu" else ""
        print(
            f"{row['model']:>9} {row['case']:>15} {row['method']:>15} "
            f"{row['resolution'] or '-':>5} {row['seconds']:9.2f} {row['cpu_seconds']:8.2f} "
            f"{row['queries'] or '-':>11} "
            f"{row['faces'] if row['faces'] is not None else '-':>8} "
            f"{row['peak_rss_mb']:>6d} MB {row['peak_above_weights_mb']:>6d} MB "
            f"{distance_to_dense(row, rows, verts_of):>10}{cuda}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--full", action="store_true", help="only the full-size model")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="R=128 and 256 for the classroom model, 128 for the full-size one (minutes)",
    )
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), choices=CASES)
    parser.add_argument("--skip-official-above", type=int, default=256, help="baseline's max R")
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu or cuda")
    parser.add_argument("--json", type=Path, default=Path("outputs/bench_mesh.json"))
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--resolution", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--threshold", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--save-verts", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # child process: one case, JSON on stdout
        print(json.dumps(run_case(args)))
        return

    models = ["full"] if args.full else args.models
    resolutions = {model: args.resolutions for model in models}
    if args.quick:
        resolutions = {"classroom": [128, 256], "full": [128]}
    rows, verts_of = [], {}
    load_before = " ".join(f"{x:.2f}" for x in psutil.getloadavg())
    with tempfile.TemporaryDirectory() as scratch:
        for model in models:
            threshold = threshold_of(model)
            jobs = [(case, 0) for case in ("forward", "render128") if case in args.cases]
            for resolution in resolutions[model]:
                for case in args.cases:
                    if case in EXTRACTIONS and not (
                        case == "official" and resolution > args.skip_official_above
                    ):
                        jobs.append((case, resolution))
            for case, resolution in jobs:
                save = Path(scratch) / f"{model}_{case}_{resolution}.npy"
                command = [sys.executable, __file__, "--case", case, "--model", model]
                command += ["--resolution", str(resolution), "--threshold", str(threshold)]
                command += ["--device", args.device, "--save-verts", str(save)]
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    row = {"model": model, "case": case, "resolution": resolution}
                    rows.append({**row, "error": done.stderr[-300:]})
                else:
                    rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                    if save.is_file():
                        verts_of[id(rows[-1])] = save
                print(f"done: {model} {case} R={resolution or '-'}", flush=True)
        load = " ".join(f"{x:.2f}" for x in psutil.getloadavg())
        print(
            f"\n{psutil.cpu_count()} CPUs, load average (1, 5, 15 min) {load_before} before, "
            f"{load} after; torch {torch.__version__}"
        )
        print_table(rows, verts_of)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
