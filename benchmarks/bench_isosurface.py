"""Benchmark tsr.mesh.extract_isosurface: dense vs coarse_to_fine vs certified vs blocks.

Fields: analytic shapes (cheap: time is mostly marching cubes) and a decoder-like field
(TripoSR's decoder shape, random weights, smooth triplane: time is mostly queries), plus
the official procedure (whole grid built up front, 8192-point chunks, results concatenated)
as a baseline. Every run is a fresh subprocess so its peak RSS is its own.

    .venv/bin/python benchmarks/bench_isosurface.py                      # 256, all fields
    .venv/bin/python benchmarks/bench_isosurface.py --resolutions 512 --fields sphere \
        --methods blocks coarse_to_fine
    .venv/bin/python benchmarks/bench_isosurface.py --chunk-sweep        # chunk sizes only
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mcubes
import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree
from torch import nn

from tsr.mesh import default_chunk_size, extract_isosurface

RADIUS = 0.87
ANALYTIC_THRESHOLD = 0.0
DECODER_THRESHOLD = 25.0  # TripoSR's; the decoder field below is built to cross it


def sphere(p):
    return 0.5 - (p - p.new_tensor([0.1, -0.05, 0.03])).norm(dim=-1)


def ellipsoid(p):
    axes = p.new_tensor([0.6, 0.35, 0.45])
    return 1.0 - (((p - p.new_tensor([-0.05, 0.08, 0.0])) / axes) ** 2).sum(-1)


def torus(p):
    ring = p[:, :2].norm(dim=-1) - 0.45
    return 0.15 - torch.sqrt(ring**2 + p[:, 2] ** 2)


def blobs(p):
    centres = p.new_tensor(
        [[0.25, 0.1, 0.0], [-0.3, 0.0, 0.1], [0.0, -0.3, -0.2], [0.05, 0.3, 0.3]]
    )
    sigmas = p.new_tensor([0.18, 0.22, 0.15, 0.12])
    d2 = ((p[:, None, :] - centres) ** 2).sum(-1)  # (N, 4)
    return torch.exp(-d2 / (2 * sigmas**2)).sum(-1) - 0.5


class DecoderField(nn.Module):
    """TripoSR's query path at full size with random weights: triplane (3, 40, 64, 64) ->
    grid_sample -> (N, 120) -> 10-layer SiLU MLP -> density_act = exp(d - 1).

    A trained model's triplane is smooth and its density rises towards the object, so the
    planes are upsampled low-frequency noise and the raw density gets a radial ramp; the cost
    per point is the real decoder's.
    """

    def __init__(self, mlp_weight: float, seed: int = 0):
        super().__init__()
        self.mlp_weight = mlp_weight  # how much the random MLP dents the sphere-like ramp
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(3, 40, 8, 8, generator=generator)
        self.planes = F.interpolate(noise, size=(64, 64), mode="bicubic", align_corners=False)
        layers = [nn.Linear(120, 64), nn.SiLU()]
        for _ in range(8):
            layers += [nn.Linear(64, 64), nn.SiLU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(64, 4))
        with torch.no_grad():
            for parameter in self.mlp.parameters():  # O(1) activations through 10 layers
                fan_in = parameter.shape[-1]
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 2 / fan_in**0.5)

    def forward(self, points):  # (N, 3) -> (N,)
        uv = points / RADIUS  # (N, 3) in [-1, 1]
        grids = torch.stack([uv[:, [0, 1]], uv[:, [0, 2]], uv[:, [1, 2]]])[:, None]  # (3,1,N,2)
        features = F.grid_sample(self.planes, grids, align_corners=False)  # (3, 40, 1, N)
        features = features[:, :, 0].permute(2, 0, 1).reshape(len(points), 120)
        raw = self.mlp_weight * self.mlp(features)[:, 0] + 12.0 * (0.85 - points.norm(dim=-1))
        return torch.exp(raw - 1.0)


FIELDS = {"sphere": sphere, "ellipsoid": ellipsoid, "torus": torus, "blobs": blobs}
# Bounds on |grad field| in [-0.87, 0.87]^3, for method "certified" (fields without one skip it).
LIPSCHITZ = {
    "sphere": 1.0,  # a distance
    "torus": 1.0,  # a distance to a circle
    # |grad| = 2 |(p - c) / a^2| <= 2 |(0.92, 0.95, 0.87) / a^2| (the box's farthest corner)
    "ellipsoid": 2 * float(torch.tensor([0.92 / 0.36, 0.95 / 0.1225, 0.87 / 0.2025]).norm()),
    # each Gaussian's slope is at most 1 / (sigma sqrt(e))
    "blobs": sum(1 / (s * math.e**0.5) for s in (0.18, 0.22, 0.15, 0.12)),
}


def make_field(name: str):
    if name == "decoder":  # lumpy, with small floaters, as random weights give
        return DecoderField(mlp_weight=0.15).eval(), DECODER_THRESHOLD
    if name == "decoder_smooth":  # a smooth dented ball at the decoder's cost per point
        return DecoderField(mlp_weight=0.03).eval(), DECODER_THRESHOLD
    return FIELDS[name], ANALYTIC_THRESHOLD


def official_procedure(field, resolution: int, threshold: float):
    """TripoSR's extract_mesh steps as the SPEC describes them (our words, not its code)."""
    unit = torch.linspace(0, 1, resolution)
    grid = torch.stack(torch.meshgrid(unit, unit, unit, indexing="ij"), -1).reshape(-1, 3)
    grid = grid * (2 * RADIUS) + -RADIUS  # (R^3, 3), all of it at once
    with torch.no_grad():
        density = torch.cat([field(grid[i : i + 8192]) for i in range(0, len(grid), 8192)])
    level = (density - threshold).view(resolution, resolution, resolution)
    verts, faces = mcubes.marching_cubes(level.numpy(), 0.0)
    world = torch.from_numpy(verts).float() / (resolution - 1.0) * (2 * RADIUS) + -RADIUS
    return world.numpy(), faces.astype(np.int64), resolution**3


def run_one(args) -> None:
    """Child process: one field x resolution x method; prints a JSON line, saves verts."""
    torch.set_num_threads(args.threads)
    field, threshold = make_field(args.field)
    chunk_size = default_chunk_size("cpu") if args.chunk_size is None else args.chunk_size
    start = time.perf_counter()
    if args.method == "official":
        verts, faces, n_queries = official_procedure(field, args.resolution, threshold)
        query_s = marching_s = float("nan")
    else:
        extraction = extract_isosurface(
            field,
            args.resolution,
            threshold,
            method=args.method,
            chunk_size=chunk_size,
            backend=args.backend,
            lipschitz=LIPSCHITZ.get(args.field),
        )
        verts, faces, n_queries = extraction.verts, extraction.faces, extraction.n_queries
        query_s, marching_s = extraction.query_seconds, extraction.marching_seconds
    seconds = time.perf_counter() - start
    np.save(args.save_verts, verts)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB
    row = {
        "field": args.field,
        "resolution": args.resolution,
        "method": args.method,
        "chunk_size": 8192 if args.method == "official" else chunk_size,
        "seconds": seconds,
        "query_s": query_s,
        "marching_s": marching_s,
        "n_queries": n_queries,
        "verts": len(verts),
        "faces": len(faces),
        "peak_rss_mb": peak_mb,
    }
    print(json.dumps(row))


def spawn(field, resolution, method, chunk_size, args, save_verts) -> dict:
    command = [sys.executable, __file__, "--one", "--field", field, "--method", method]
    command += ["--resolution", str(resolution)]
    command += ["--chunk-size", str(chunk_size)] if chunk_size is not None else []
    command += ["--threads", str(args.threads), "--backend", args.backend]
    command += ["--save-verts", str(save_verts)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def hausdorff_voxels(a: np.ndarray, b: np.ndarray, resolution: int) -> float:
    if len(a) == 0 or len(b) == 0:
        return math.inf
    distance = max(cKDTree(b).query(a)[0].max(), cKDTree(a).query(b)[0].max())
    return float(distance / (2 * RADIUS / (resolution - 1)))


def print_table(rows: list[dict]) -> None:
    columns = [  # (key, header, format)
        ("field", "field", "14"),
        ("resolution", "R", "5d"),
        ("method", "method", "15"),
        ("chunk_size", "chunk", "7d"),
        ("seconds", "seconds", "8.2f"),
        ("query_s", "query_s", "8.2f"),
        ("marching_s", "mc_s", "6.2f"),
        ("n_queries", "queries", "11d"),
        ("fewer_queries", "fewer", "6.1f"),
        ("speedup_vs_dense", "x_dense", "7.2f"),
        ("speedup_vs_official", "x_offic", "7.2f"),
        ("faces", "faces", "8d"),
        ("peak_rss_mb", "rss_MB", "7.0f"),
        ("hausdorff_voxels", "hausd_vox", "9.3f"),
    ]
    widths = [int(fmt.rstrip("dfs").split(".")[0]) for _, _, fmt in columns]
    print(" ".join(f"{title:>{w}}" for (_, title, _), w in zip(columns, widths, strict=True)))
    for row in rows:
        cells = [
            format(row[key], fmt) if row[key] is not None else f"{'-':>{w}}"
            for (key, _, fmt), w in zip(columns, widths, strict=True)
        ]
        print(" ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256])
    parser.add_argument("--fields", nargs="+", default=[*FIELDS, "decoder_smooth", "decoder"])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["official", "dense", "blocks", "coarse_to_fine", "certified"],
    )
    parser.add_argument("--chunk-size", type=int, help="points per query (default: per device)")
    parser.add_argument("--chunk-sweep", action="store_true", help="decoder field, dense, R=128")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--repeats", type=int, default=1, help="runs per case; the fastest is kept")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks/isosurface.json"))
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--field", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--resolution", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--save-verts", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args)
        return

    if args.chunk_sweep:
        sizes = (4096, 8192, 16384, 32768, 65536, 262144)
        plan = [("decoder", 128, "dense", size) for size in sizes]
    else:
        plan = [
            (field, resolution, method, args.chunk_size)
            for resolution in args.resolutions
            for field in args.fields
            for method in args.methods
            if method != "certified" or field in LIPSCHITZ
        ]
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        # Repeats go round the whole plan, so a busy spell of a shared machine hits every
        # method alike; the fastest repeat is kept.
        for repeat in range(args.repeats):
            for case in plan:
                field, resolution, method, chunk_size = case
                save = Path(scratch) / f"{field}_{resolution}_{method}_{chunk_size}.npy"
                row = spawn(field, resolution, method, chunk_size, args, save)
                print(f"{repeat}: {field} R={resolution} {method}: {row['seconds']:.2f} s")
                if case not in rows or row["seconds"] < rows[case]["seconds"]:
                    rows[case] = {**row, "verts_file": save, "repeats": args.repeats}
        rows = list(rows.values())
        for row in rows:  # compare with the dense and official runs of the same field and R
            same = {
                r["method"]: r
                for r in rows
                if (r["field"], r["resolution"]) == (row["field"], row["resolution"])
            }
            dense, official = same.get("dense"), same.get("official")
            row["fewer_queries"] = dense and dense["n_queries"] / row["n_queries"]
            row["speedup_vs_dense"] = dense and dense["seconds"] / row["seconds"]
            row["speedup_vs_official"] = official and official["seconds"] / row["seconds"]
            row["hausdorff_voxels"] = dense and hausdorff_voxels(
                np.load(row["verts_file"]), np.load(dense["verts_file"]), row["resolution"]
            )
        for row in rows:
            del row["verts_file"]
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"threads": args.threads, "backend": args.backend, "torch": torch.__version__}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
