"""`python -m tsr IMAGE...`: images -> meshes (and optional turntable renders), like run.py.

TripoSR's run.py flags work as written (`--pretrained-model-name-or-path`,
`--model-save-format`, `--bake-texture`, ...), so its README's commands run with `python -m
tsr` in place of `python run.py`. Each image gets a folder in --output-dir named after its file
stem; inputs that share a stem get the stem plus a hash of their path (see
`tsr.export.output_names`). Every file is written atomically.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .bake import DEFAULT_TEXTURE_RESOLUTION, bake_texture
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
from .export import output_names, save_image, save_mesh
from .files import write_bytes
from .io import DEFAULT_MODEL
from .model import TSR
from .preprocess import has_transparency, load_image, remove_background, resize_foreground
from .renderer import DECODER_CHUNK


def add_bake_arguments(parser: argparse.ArgumentParser) -> None:
    """--bake-texture and --texture-resolution, for every CLI that writes meshes."""
    parser.add_argument(
        "--bake-texture",
        action="store_true",
        help="a UV atlas and a colour texture instead of vertex colours (GLB embeds it; OBJ "
        "writes <mesh>.mtl and <mesh>.png beside the mesh)",
    )
    parser.add_argument(
        "--texture-resolution",
        type=int,
        default=DEFAULT_TEXTURE_RESOLUTION,
        help="texture width and height in texels, with --bake-texture",
    )


def check_bake_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.texture_resolution < 1:
        parser.error(f"--texture-resolution must be positive, got {args.texture_resolution}")
    if args.bake_texture and args.format not in ("obj", "glb"):
        parser.error(f"--bake-texture writes obj or glb: {args.format} files hold no texture")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m tsr", description=__doc__)
    parser.add_argument("images", nargs="+", type=Path, help="input image files")
    parser.add_argument(
        "--pretrained",
        "--pretrained-model-name-or-path",
        dest="pretrained",
        default=DEFAULT_MODEL,
        help="folder, Hub repo id, or a shipped model name",
    )
    parser.add_argument("--output-dir", type=Path, default=Path("outputs"))
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="a CUDA device without CUDA falls back to the CPU, with a notice (as run.py)",
    )
    parser.add_argument(
        "--chunk-size",
        type=non_negative_int,
        default=DECODER_CHUNK,
        help="points per decoder call (0: all at once)",
    )
    parser.add_argument("--mc-resolution", type=grid_resolution, default=256)
    parser.add_argument(
        "--threshold", type=positive_float, default=None, help="default: the model's"
    )
    parser.add_argument(
        "--mc-method", default="auto", choices=["auto", "dense", "band", "coarse_to_fine", "blocks"]
    )
    parser.add_argument(
        "--format",
        "--model-save-format",
        dest="format",
        default="obj",
        choices=["obj", "glb", "ply"],
    )
    parser.add_argument("--no-remove-bg", action="store_true", help="the image is ready as is")
    parser.add_argument("--foreground-ratio", type=fraction, default=0.85)
    parser.add_argument(
        "--render",
        action="store_true",
        help="also save 30 turntable views (PNGs; run.py writes an mp4)",
    )
    add_bake_arguments(parser)
    args = parser.parse_args(argv)
    check_bake_arguments(parser, args)
    return args


def resolve_device(requested: str) -> str:
    """The device asked for, or the CPU (with a notice) when it is a CUDA one without CUDA."""
    try:
        wants_cuda = torch.device(requested).type == "cuda"
    except RuntimeError:
        return requested  # not a device name: check_device says so
    if wants_cuda and not torch.cuda.is_available():
        print(f"--device {requested}: CUDA is not available, running on the CPU", file=sys.stderr)
        return "cpu"
    return requested


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
    args.device = resolve_device(args.device)
    check_device(args.device)
    check_images(args.images)
    model = TSR.from_pretrained(args.pretrained).to(args.device)
    model.renderer.set_chunk_size(args.chunk_size)
    summary = []
    # closed on any way out, so an error message is not glued to the bar
    with tqdm(args.images, desc="images", unit="image") as images:
        for path, name in zip(images, output_names(args.images), strict=True):
            out = args.output_dir / name
            image = prepare_input(path, not args.no_remove_bg, args.foreground_ratio)
            save_image(image, out / "input.png")
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
            baked = args.bake_texture and len(mesh.faces) > 0
            if baked:
                mesh = bake_texture(model, scene_codes[0], mesh, args.texture_resolution)
            elif args.bake_texture:
                tqdm.write(f"{path}: empty mesh, nothing to bake; try a lower --threshold")
            mesh_path = out / f"mesh.{args.format}"
            save_mesh(mesh, mesh_path)
            if args.render:
                views = model.render(scene_codes, n_views=30, return_type="pil")[0]
                for index, view in enumerate(views):
                    save_image(view, out / f"render_{index:03d}.png")
            summary.append(
                {
                    "image": str(path),
                    "mesh": str(mesh_path),
                    "vertices": len(mesh.vertices),
                    "faces": len(mesh.faces),
                    "texture": args.texture_resolution if baked else None,
                    "seconds": round(time.perf_counter() - started, 2),
                }
            )
            tqdm.write(f"{path} -> {mesh_path} ({len(mesh.faces)} faces)")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    settings["images"] = [str(p) for p in args.images]
    run = {"settings": settings, "outputs": summary}
    write_bytes(args.output_dir / "run.json", json.dumps(run, indent=2).encode())


if __name__ == "__main__":
    sys.exit(run_cli(main))
