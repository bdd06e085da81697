"""prepare_data.py throughput: this tree against an older checkout, in one run.

    git archive <old-commit> | tar -x -C /tmp/old        # the tree to compare with
    python benchmarks/bench_prepare_data.py --old /tmp/old --repeats 2

Builds each set from both trees in ABBA order (old, new, new, old, ...), so that a load that
drifts during the run falls on both alike, each time into a fresh folder, and reports per
build views per wall second (what prepare_data.py prints) and per CPU second of the build
process (less sensitive to other processes on a shared machine), the mean ratios new/old,
and the load average around each build. The sets:
- default: `prepare_data.py`'s default set (procedural shapes with vertex/face colours);
  the views are also compared byte for byte between the trees;
- stl: the same shapes exported as STL without colours (untextured CAD-like input), read
  through --input-folder (painted differently by the two trees, so not compared).
Both use --workers 1, so the timing is one process's and not the scheduler's.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build(tree: Path, out: Path, args: list[str]) -> tuple[float, float]:
    """Run one tree's prepare_data.py into `out`. -> (views per wall second as it reports,
    views per CPU second of the process: less sensitive to other processes' load)"""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(
        [sys.executable, str(tree / "prepare_data.py"), "--out", str(out), "--workers", "1", *args],
        cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True,
    )  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise RuntimeError(f"{tree}: prepare_data.py failed:\n{result.stderr}")
    views, seconds = re.search(r"(\d+) views in ([0-9.]+) s", result.stdout).groups()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return int(views) / float(seconds), int(views) / cpu


def export_stl(folder: Path, n_objects: int) -> None:
    """The default set's shapes as colourless STL files."""
    sys.path.insert(0, str(REPO))
    from utils.data.build import procedural_jobs
    from utils.data.shapes import make_shape

    folder.mkdir(parents=True)
    for job in procedural_jobs(["primitives", "parts"], n_objects):
        make_shape(job.family, job.index, seed=0).export(folder / f"{job.object_id}.stl")


def same_views(old: Path, new: Path) -> tuple[int, int]:
    """Views byte-identical between two builds. -> (identical, total)"""
    files = sorted(p.relative_to(old) for p in old.rglob("*") if p.parent.name in ("rgba", "depth"))
    same = sum((old / f).read_bytes() == (new / f).read_bytes() for f in files)
    return same, len(files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", type=Path, required=True, help="checkout of the older tree")
    parser.add_argument("--repeats", type=int, default=2, help="builds per tree and set (even)")
    parser.add_argument("--n", type=int, default=48, help="objects per set (default set: 48)")
    parser.add_argument("--sets", default="default,stl", help="comma-separated: default, stl")
    options = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        export_stl(scratch / "stl_input", options.n)
        sets = {
            "default": ["--n", str(options.n)],
            "stl": ["--input-folder", str(scratch / "stl_input")],
        }
        for name in options.sets.split(","):
            speeds = {"old": [], "new": []}
            for repeat in range(options.repeats):
                trees = [("old", options.old.resolve()), ("new", REPO)]
                for label, tree in trees if repeat % 2 == 0 else trees[::-1]:  # ABBA: drift cancels
                    load = os.getloadavg()[0]
                    out = scratch / f"{name}_{label}_{repeat}"
                    wall, cpu = build(tree, out, sets[name])
                    speeds[label].append((wall, cpu))
                    print(f"{name:8s} {label}: {wall:6.3f} views/s, {cpu:6.3f} views/CPU-s "
                          f"(load {load:.1f} -> {os.getloadavg()[0]:.1f})", flush=True)  # fmt: skip
            for k, unit in enumerate(("views/s", "views/CPU-s")):
                old, new = (statistics.mean(s[k] for s in speeds[t]) for t in ("old", "new"))
                print(
                    f"{name:8s} mean {unit}: old {old:.3f}, new {new:.3f}, new/old {new / old:.3f}"
                )
            if name == "default":
                same, total = same_views(scratch / "default_old_0", scratch / "default_new_0")
                print(f"{name:8s} views byte-identical old vs new: {same}/{total}")


if __name__ == "__main__":
    main()
