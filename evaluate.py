"""Score the base model, and optionally an adapter, on a dataset split, beside the best sphere.

    python evaluate.py --data data/default --split test
    python evaluate.py --data data/default --split test --adapter outputs_lora/run/adapter

Writes into --output-dir: metrics.json (per object and summary), metrics.md (tables with
standard errors and paired base-vs-adapter differences), metrics.png (bars) and the meshes
(meshes/<model>/<object>.obj) for notebook 05's gallery. Beside our world-frame scores, the
"paper" columns score the same meshes as the TripoSR and SF3D papers do (unit bounding box,
rotation search and ICP, F@0.1/0.2/0.5); --no-paper-protocol skips them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from tsr.io import DEFAULT_MODEL
from tsr.model import TSR
from utils.data.dataset import MultiViewDataset
from utils.evaluation.evaluate import evaluate_model, sphere_records
from utils.evaluation.paper_protocol import add_paper_protocol
from utils.evaluation.report import compare, write_report
from utils.training.adapters import load_adapter
from utils.training.lora import merge_adapter


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="data/default", help="a prepare_data.py dataset folder")
    parser.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    parser.add_argument(
        "--pretrained",
        default=DEFAULT_MODEL,
        help="base model: folder, Hub repo id or shipped name",
    )
    parser.add_argument("--adapter", help="LoRA adapter: folder, .safetensors or lora_weights.pth")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/eval"))
    parser.add_argument("--mc-resolution", type=int, default=128, help="marching-cubes grid")
    parser.add_argument("--threshold", type=float, default=None, help="default: the model's")
    parser.add_argument("--n-points", type=int, default=10_000, help="surface points per mesh")
    parser.add_argument("--views", type=int, default=None, help="views per object (default all)")
    parser.add_argument("--max-objects", type=int, default=None, help="the first N of the split")
    parser.add_argument("--seed", type=int, default=0, help="surface sampling seed")
    parser.add_argument(
        "--paper-protocol", action=argparse.BooleanOptionalAction, default=True,
        help="also score as TripoSR/SF3D do: unit box, rotation search + ICP, F@0.1/0.2/0.5",
    )  # fmt: skip
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        base = TSR.from_pretrained(args.pretrained)
        dataset = MultiViewDataset(
            args.data, args.split, args.views, cond_size=base.config.cond_image_size
        )
        adapted = None
        if args.adapter:
            adapted = merge_adapter(
                load_adapter(TSR.from_pretrained(args.pretrained), args.adapter)
            )
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.max_objects is not None:
        dataset.object_ids = dataset.object_ids[: args.max_objects]
    if len(dataset) == 0:
        print(f"error: split {args.split!r} of {args.data} has no objects", file=sys.stderr)
        return 2
    # One level for both models, so a difference in meshes is the adapter's, not the threshold's.
    threshold = base.config.mc_threshold if args.threshold is None else args.threshold
    common = {
        "mc_resolution": args.mc_resolution,
        "threshold": threshold,
        "n_points": args.n_points,
        "seed": args.seed,
        "device": args.device,
    }
    records = {"sphere": sphere_records(dataset, args.n_points, args.seed)}
    meshes = args.output_dir / "meshes"
    records["base"] = evaluate_model(base, dataset, mesh_dir=meshes / "base", name="base", **common)
    if adapted is not None:
        records["lora"] = evaluate_model(
            adapted, dataset, mesh_dir=meshes / "lora", name="lora", **common
        )
    if args.paper_protocol:
        for name, rows in records.items():
            add_paper_protocol(rows, dataset, args.n_points, args.seed, name=name)
    settings = {
        **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "threshold_used": threshold,
        "base_source": base.source,
        "base_fingerprint": base.weights_fingerprint(),
        "objects": list(dataset.object_ids),
    }
    paths = write_report(compare(records, base="base"), args.output_dir, settings)
    print(paths["markdown"].read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())} and meshes in {meshes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
