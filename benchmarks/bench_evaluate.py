"""Notebook 05's evaluation at its size: `evaluate_models` (sphere, base and a LoRA adapter) and
the papers' protocol on a dataset split, with wall time, CPU time, peak RSS and load average.

    python benchmarks/bench_evaluate.py --data data/parts --adapter outputs_lora/workbook/adapter
    git archive main | tar -x -C /tmp/old    # an earlier tree to compare with
    python benchmarks/bench_evaluate.py --data ... --adapter ... --baseline /tmp/old --rounds 2

Each case runs in a fresh process, so its peak RSS and its imports are its own. --baseline
names a copy of an earlier commit: its cases alternate with this tree's, so that a machine
shared with other work slows both alike, and the mean of every metric is printed for both
trees, to show whether the numbers stayed. Trees from before the papers' columns were scored
in the evaluation pass (`paper_protocol=True`) score them afterwards with add_paper_protocol,
as notebook 05 then did. "cpu_s" is the case's CPU time (all threads): on a busy machine,
cpu_s / 2 estimates the wall time on 2 idle cores better than the wall time does. Run with
OMP_WAIT_POLICY=PASSIVE on a shared machine (spinning OpenMP threads slow every case).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]


def run_case(args: argparse.Namespace) -> dict:
    """Notebook 05's section 2 in this process, with the tree on sys.path first. -> measurements"""
    from tsr.model import TSR
    from utils.data.dataset import MultiViewDataset
    from utils.evaluation import evaluate, paper_protocol
    from utils.training import adapters, lora

    base = TSR.from_pretrained(args.model).eval()
    tuned = lora.merge_adapter(adapters.load_adapter(TSR.from_pretrained(args.model), args.adapter))
    test = MultiViewDataset(args.data, args.split, 4, cond_size=base.config.cond_image_size)
    test.object_ids = test.object_ids[: args.objects]
    settings = {"mc_resolution": 128, "n_points": 10_000, "mesh_dir": Path(args.out) / "meshes"}
    one_pass = "paper_protocol" in inspect.signature(evaluate.evaluate_models).parameters
    if one_pass:
        settings["paper_protocol"] = args.paper
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    records = evaluate.evaluate_models({"base": base, "LoRA": tuned}, test, **settings)
    evaluated = time.perf_counter()
    if args.paper and not one_pass:
        for name, rows in records.items():
            paper_protocol.add_paper_protocol(rows, test, settings["n_points"], name=name)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "records.json").write_text(json.dumps(records, indent=1) + "\n")
    return {
        "code": str(Path(evaluate.__file__).parents[2]), "objects": len(test), "paper": args.paper, "one_pass": one_pass,
        "evaluate_s": round(evaluated - started, 1),
        "paper_after_s": round(time.perf_counter() - evaluated, 1),
        "total_s": round(time.perf_counter() - started, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2),
        "load_average": [load_before, os.getloadavg()[0]],
        "means": {name: _means(rows) for name, rows in records.items()},
    }  # fmt: skip


def _means(rows: list[dict]) -> dict[str, float]:
    """The mean of each numeric column over the objects where it is finite."""
    columns = [k for k, v in rows[0].items() if isinstance(v, float) and k != "seconds"]
    means = {}
    for column in columns:
        values = [r[column] for r in rows if isinstance(r.get(column), float)]
        finite = [v for v in values if math.isfinite(v)]
        means[column] = sum(finite) / len(finite) if finite else math.nan
    return means


def spawn(args: argparse.Namespace, tree: Path, out: Path, paper: bool) -> dict:
    """run_case in a fresh process that imports `tree`'s code. -> its measurements"""
    command = [sys.executable, __file__, "--case", "--tree", str(tree), "--out", str(out),
               "--data", str(args.data), "--split", args.split, "--model", args.model,
               "--adapter", str(args.adapter), "--objects", str(args.objects)]  # fmt: skip
    command += [] if paper else ["--no-paper"]
    environment = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
    if done.returncode != 0:
        raise SystemExit(f"case failed ({tree}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a prepare_data.py dataset")
    parser.add_argument("--split", default="test")
    parser.add_argument("--model", default="classroom", help="shipped name, folder or Hub id")
    parser.add_argument("--adapter", type=Path, required=True, help="the LoRA adapter folder")
    parser.add_argument("--objects", type=int, default=60, help="the first N of the split")
    parser.add_argument("--paper", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--baseline", type=Path, help="an earlier tree to alternate with")
    parser.add_argument("--rounds", type=int, default=1, help="cases per tree")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_evaluate"))
    parser.add_argument("--case", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tree", type=Path, default=REPOSITORY, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        sys.path.insert(0, str(args.tree))
        print(json.dumps(run_case(args)))
        return 0

    trees = {"this": REPOSITORY} | ({"baseline": args.baseline} if args.baseline else {})
    results = []
    for round_ in range(args.rounds):
        for name, tree in trees.items():
            result = spawn(args, tree.resolve(), args.out / f"{name}-{round_}", args.paper)
            results.append({"name": name, **result})
            print(json.dumps({k: v for k, v in results[-1].items() if k != "means"}))
    for name in trees:  # the numbers of each tree's last case, side by side
        print(name, json.dumps(next(r for r in reversed(results) if r["name"] == name)["means"]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
