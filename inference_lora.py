"""Image -> mesh with a LoRA adapter on a base TripoSR model (the course project's CLI).

    python inference_lora.py --image_path examples/sphere.png --lora_path outputs_lora/run/adapter
    python inference_lora.py --image_path chair.png --lora_path lora_weights.pth --repo_root .
    python inference_lora.py --image_dir photos/ --output_dir meshes/ [--lora_path ...]
    python inference_lora.py --image_path chair.png --output chair.glb --bake-texture

The adapter's rank, alpha and targets are read from its files, never assumed (the course
project's lora_weights.pth has no alpha: its r=16/alpha=16 convention applies). The adapter is
merged into the base weights before inference. Without --lora_path the base model runs, which
gives the batch mode's "base" meshes. Settings are saved next to the output as .json. Files are
written atomically; in batch mode two images with the same stem (x.png, x.jpg) get distinct
names (see tsr.export.output_names). --bake-texture writes a textured mesh (obj or glb).
"""

from __future__ import annotations

import tsr  # noqa: F401  first, before torch: it sets OMP_WAIT_POLICY (tsr/__init__.py)

# isort: split
import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tsr.__main__ import add_bake_arguments, check_bake_arguments, check_images, prepare_input
from tsr.bake import bake_texture
from tsr.errors import (
    ArgumentParser,
    UserInputError,
    check_device,
    fraction,
    grid_resolution,
    positive_float,
    run_cli,
)
from tsr.export import output_names, save_mesh
from tsr.files import write_bytes
from tsr.io import DEFAULT_MODEL
from tsr.model import TSR
from utils.training.adapters import load_adapter
from utils.training.lora import merge_adapter

FORMATS = ("obj", "glb", "ply", "stl")
DEFAULT_OUTPUT_DIR = Path("outputs/inference")  # under outputs/ (ignored), not the repository root
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="inference_lora.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image_path", type=Path, help="one image")
    source.add_argument("--image_dir", type=Path, help="batch mode: every image in this folder")
    parser.add_argument("--lora_path", help="adapter folder, .safetensors or lora_weights.pth")
    parser.add_argument(
        "--repo_root", default=DEFAULT_MODEL, help="base model: folder, Hub repo id or shipped name"
    )
    parser.add_argument(
        "--output", type=Path, help=f"mesh file (default {DEFAULT_OUTPUT_DIR}/mesh_lora.<format>)"
    )
    parser.add_argument("--output_dir", type=Path, help="batch mode: where the meshes go")
    parser.add_argument("--format", choices=FORMATS, help="default: --output's suffix, else obj")
    parser.add_argument(
        "--mc-resolution", type=grid_resolution, default=256, help="marching-cubes grid"
    )
    parser.add_argument(
        "--threshold", type=positive_float, default=None, help="default: the model's"
    )
    parser.add_argument("--no-remove-bg", action="store_true", help="the image is ready as is")
    parser.add_argument("--foreground-ratio", type=fraction, default=0.85)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_bake_arguments(parser)
    args = parser.parse_args(argv)
    if args.image_dir is not None and args.output_dir is None:
        parser.error("--image_dir needs --output_dir")
    if args.format is None:
        suffix = args.output.suffix.lstrip(".") if args.output else ""
        args.format = suffix if suffix in FORMATS else "obj"
    if args.output is None:
        args.output = DEFAULT_OUTPUT_DIR / f"mesh_lora.{args.format}"
    check_bake_arguments(parser, args)
    return args


def load_model(repo_root: str, lora_path: str | None, device: str) -> tuple[TSR, dict]:
    """The base model with the adapter merged in (or alone), and what was loaded."""
    model = TSR.from_pretrained(repo_root)
    info = {"base_model": model.source, "base_fingerprint": model.weights_fingerprint()}
    if lora_path:
        model = merge_adapter(load_adapter(model, lora_path))
        info["adapter"] = str(lora_path)
    return model.to(device).eval(), info


def image_to_mesh(model: TSR, image_path: Path, out_path: Path, args: argparse.Namespace) -> dict:
    """One image -> one mesh file. -> a summary row (an empty mesh is written and reported)."""
    started = time.perf_counter()
    image = prepare_input(image_path, not args.no_remove_bg, args.foreground_ratio)
    with torch.no_grad():
        scene_codes = model([image], device=args.device)
    mesh = model.extract_mesh(
        scene_codes, has_vertex_color=True, resolution=args.mc_resolution, threshold=args.threshold
    )[0]
    if len(mesh.faces) == 0:
        tqdm.write(f"{image_path}: empty mesh (no density reaches the threshold); try --threshold")
    elif args.bake_texture:
        mesh = bake_texture(model, scene_codes[0], mesh, args.texture_resolution)
    save_mesh(mesh, out_path, args.format)
    return {
        "image": str(image_path),
        "mesh": str(out_path),
        "vertices": len(mesh.vertices),
        "faces": len(mesh.faces),
        "seconds": round(time.perf_counter() - started, 2),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_device(args.device)
    if args.lora_path and not Path(args.lora_path).exists():
        raise UserInputError(
            "adapter not found", args.lora_path,
            "pass the adapter/ folder of a fine_tuning.py run, or its lora_weights.pth",
        )  # fmt: skip
    if args.image_dir is not None:
        images = sorted(p for p in args.image_dir.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise UserInputError(
                f"no images ({', '.join(IMAGE_SUFFIXES)}) in it", args.image_dir,
                "pass a folder of images, or one image with --image_path",
            )  # fmt: skip
        names = output_names(images)
        jobs = [
            (p, args.output_dir / f"{n}.{args.format}") for p, n in zip(images, names, strict=True)
        ]
        settings_path = args.output_dir / "inference.json"
    else:
        jobs = [(args.image_path, args.output)]
        settings_path = args.output.with_suffix(".json")
    check_images([image for image, _ in jobs])
    try:
        model, loaded = load_model(args.repo_root, args.lora_path, args.device)
        # closed on any way out, so an error message is not glued to the bar
        with tqdm(jobs, desc="meshes", unit="image") as bar:
            outputs = [image_to_mesh(model, image, out, args) for image, out in bar]
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    threshold = model.config.mc_threshold if args.threshold is None else args.threshold
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    record = {"settings": settings, "threshold_used": threshold, **loaded, "outputs": outputs}
    write_bytes(settings_path, json.dumps(record, indent=2).encode())
    for row in outputs:
        print(f"{row['image']} -> {row['mesh']} ({row['faces']} faces, {row['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
