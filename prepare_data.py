"""Render meshes into a multi-view dataset in TripoSR's cameras (see utils/data/build.py).

    python prepare_data.py                                   # the embedded default set
    python prepare_data.py --out data/mine --input-folder my_meshes --input-up y
    python prepare_data.py --out data/axis --n 8 --axis-views  # the course project's 6 views
    python prepare_data.py --out data/cad --input-folder parts --untextured-colour palette

Input files: .glb/.gltf (materials, textures, vertex colours; y-up by specification), .obj
(+ .mtl and images), .ply, .stl. Views look the textures up per pixel. Surfaces without any
colour (CAD exports) are painted --untextured-colour.

A rerun skips finished objects; --force rebuilds them. Files that are not usable meshes are
named and skipped; the summary at the end lists them, and the objects whose occupancy points
were withheld because their surface has no clear inside.
"""

from __future__ import annotations

import tsr  # noqa: F401  first, before torch: it sets OMP_WAIT_POLICY (tsr/__init__.py)

# isort: split
import argparse
import sys

from tsr.errors import ArgumentParser, flag_check, non_negative_int, positive_int, run_cli
from utils.data.build import MIN_SIZE, MIN_VIEWS, prepare_dataset
from utils.data.materials import UNTEXTURED_COLOUR, untextured_setting


def parse_untextured(text: str) -> str | list[float]:
    """--untextured-colour: "palette" or "R,G,B" with each in [0, 1]."""
    try:
        return untextured_setting(text if text == "palette" else text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give R,G,B in [0, 1] (e.g. 0.9,0.55,0.2) or 'palette' ({error})"
        ) from error


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="prepare_data.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument(
        "--out", default="data/default", help="dataset folder to create or complete"
    )
    parser.add_argument(
        "--family", default="primitives,parts", help="shape families, comma-separated"
    )
    parser.add_argument(
        "--n", type=positive_int, default=48, help="procedural objects, shared over families"
    )
    parser.add_argument(
        "--views", default=8, help="views per object; view 0 conditions",
        type=flag_check(int, lambda v: v >= MIN_VIEWS, f"an integer >= {MIN_VIEWS}"),
    )  # fmt: skip
    parser.add_argument(
        "--size", default=256, help="render width = height in pixels",
        type=flag_check(int, lambda v: v >= MIN_SIZE, f"an integer >= {MIN_SIZE}"),
    )  # fmt: skip
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="shapes, view jitter and split"
    )
    parser.add_argument("--input-folder", help="render these meshes (recursive) instead of shapes")
    parser.add_argument(
        "--input-up",
        choices=("z", "y"),
        default="z",
        help="up axis of .obj/.ply/.stl inputs; .glb/.gltf are y-up by specification and "
        "always read so, whatever this says (a folder may mix them)",
    )
    parser.add_argument(
        "--untextured-colour",
        type=parse_untextured,
        default=UNTEXTURED_COLOUR,
        help="sRGB colour of surfaces the file gives none (STL, bare OBJ), as R,G,B in [0, 1], "
        "or 'palette': a seeded saturated colour per object. Default %(default)s, a clay "
        "orange: it differs in hue from TripoSR's grey background at every shade, where grey "
        "0.7 matches it on faces lit at 0.71",
    )
    parser.add_argument("--axis-views", action="store_true", help="6 axis views instead of --views")
    parser.add_argument(
        "--occupancy-points",
        type=non_negative_int,
        default=0,
        help="inside/outside samples per object (0: none)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild objects that already exist")
    parser.add_argument(
        "--workers", type=positive_int, default=None, help="parallel objects (default: all cores)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = prepare_dataset(
        args.out, families=tuple(f for f in args.family.split(",") if f), n_objects=args.n,
        n_views=args.views, size=args.size, seed=args.seed, input_folder=args.input_folder,
        input_up=args.input_up, axis_views=args.axis_views, occupancy_points=args.occupancy_points,
        force=args.force, workers=args.workers, untextured=args.untextured_colour,
    )  # fmt: skip
    print(
        f"{summary['out']}: {summary['n_objects']} objects ({summary['built']} built, "
        f"{summary['already_built']} already there, {len(summary['skipped'])} skipped); "
        f"{summary['views_rendered']} views in {summary['seconds']:.1f} s "
        f"= {summary['views_per_second']:.1f} views/s"
    )
    for row in summary["skipped"]:
        print(f"skipped {row['file']}: {row['reason']}")
    occupancy = summary["occupancy_labels"]
    if any(occupancy["counts"].values()):
        counts = ", ".join(f"{n} {method}" for method, n in occupancy["counts"].items() if n)
        print(f"occupancy labels (objects): {counts}")
    for row in occupancy["withheld"]:
        print(f"no occupancy points for {row['object_id']}: {row['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
