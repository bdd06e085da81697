"""`python -m tsr IMAGE...`: images -> meshes (and optional turntable renders), like run.py."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import (
    ArgumentParser,
    UserInputError,
    check_device,
    fraction,
    grid_resolution,
    non_negative_int,
    positive_float,
    run_cli,
)
from .io import DEFAULT_MODEL
from .model import TSR
from .preprocess import has_transparency, load_image, remove_background, resize_foreground


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m tsr", description=__doc__)
    parser.add_argument("images", nargs="+", type=Path, help="input image files")
    parser.add_argument(
        "--pretrained", default=DEFAULT_MODEL, help="folder, Hub repo id, or a shipped model name"
    )
    parser.add_argument("--output-dir", type=Path, default=Path("outputs"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--chunk-size",
        type=non_negative_int,
        default=8192,
        help="points per decoder call (0: all at once)",
    )
    parser.add_argument("--mc-resolution", type=grid_resolution, default=256)
    parser.add_argument(
        "--threshold", type=positive_float, default=None, help="default: the model's"
    )
    parser.add_argument(
        "--mc-method", default="auto", choices=["auto", "dense", "coarse_to_fine", "blocks"]
    )
    parser.add_argument("--format", default="obj", choices=["obj", "glb", "ply"])
    parser.add_argument("--no-remove-bg", action="store_true", help="the image is ready as is")
    parser.add_argument("--foreground-ratio", type=fraction, default=0.85)
    parser.add_argument("--render", action="store_true", help="also save 30 turntable views")
    return parser.parse_args(argv)


def prepare_input(path: Path, remove_bg: bool, foreground_ratio: float):
    """Background removal (unless the image has transparency already) and re-framing."""
    image = load_image(path)
    try:
        if remove_bg and not has_transparency(image):
            image = remove_background(image.convert("RGB"))
        if image.mode == "RGBA" and has_transparency(image):
            image = resize_foreground(image, foreground_ratio)
    except UserInputError as error:  # name the file, not "image"
        raise UserInputError(error.what, path, error.fix) from error
    return image


def check_images(paths: list[Path]) -> None:
    """Every input readable as an image, before the model loads; all failures at once."""
    problems = []
    for path in paths:
        try:
            load_image(path)
        except UserInputError as error:
            problems.append(str(error))
    if problems:
        raise UserInputError(
            f"{len(problems)} input image(s) cannot be used", "IMAGE arguments",
            "fix or leave out each of them:\n  " + "\n  ".join(problems),
        )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_device(args.device)
    check_images(args.images)
    model = TSR.from_pretrained(args.pretrained).to(args.device)
    model.renderer.set_chunk_size(args.chunk_size)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    summary = []
    for path in tqdm(args.images, desc="images", unit="image"):
        out = args.output_dir / path.stem
        out.mkdir(parents=True, exist_ok=True)
        image = prepare_input(path, not args.no_remove_bg, args.foreground_ratio)
        image.save(out / "input.png")
        started = time.perf_counter()
        with torch.no_grad():
            scene_codes = model([image], device=args.device)
        mesh = model.extract_mesh(
            scene_codes,
            has_vertex_color=True,
            resolution=args.mc_resolution,
            threshold=args.threshold,
            method=args.mc_method,
        )[0]
        mesh_path = out / f"mesh.{args.format}"
        mesh.export(mesh_path)
        if args.render:
            views = model.render(scene_codes, n_views=30, return_type="pil")[0]
            for index, view in enumerate(views):
                view.save(out / f"render_{index:03d}.png")
        summary.append(
            {
                "image": str(path),
                "mesh": str(mesh_path),
                "vertices": len(mesh.vertices),
                "faces": len(mesh.faces),
                "seconds": round(time.perf_counter() - started, 2),
            }
        )
        tqdm.write(f"{path} -> {mesh_path} ({len(mesh.faces)} faces)")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    settings["images"] = [str(p) for p in args.images]
    (args.output_dir / "run.json").write_text(
        json.dumps({"settings": settings, "outputs": summary}, indent=2)
    )


if __name__ == "__main__":
    sys.exit(run_cli(main))
