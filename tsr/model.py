"""TSR: image -> scene codes (a triplane) -> renders and meshes.

The public API follows the official TripoSR one, so scripts port by changing an import:
`TSR.from_pretrained`, `model(images, device)`, `model.render`, `model.extract_mesh`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import trimesh
from einops import rearrange
from PIL import Image
from torch import nn

from . import mesh as mesh_extraction
from .cameras import CAMERA_DISTANCE, FOVY_DEG, orbit_cameras, rays_from_c2w
from .config import TSRConfig, load_config, named_config
from .files import atomic_path, save_torch, write_text
from .image_encoder import DINOSingleImageTokenizer
from .io import check_finite, check_state_dict, read_state_dict, resolve_model_files
from .preprocess import ImageLike, prepare_images
from .renderer import TriplaneNeRFRenderer
from .transformer import Transformer1D
from .triplane import NeRFMLP, Triplane1DTokenizer, TriplaneUpsampleNetwork

# rays per render_rays call when rendering whole images: bounds memory at any image size
RAY_CHUNK = 16384

# extract_mesh's "auto" queries only a band around the surface (tsr.mesh "band"): coarse
# samples about half a triplane texel apart; every point of the cells where they change sign
# or come within a factor e^2 (7.4) of the threshold, and one cell around those; a band
# covering most cells queries them all (tsr.grid_sampling.BAND_DENSE_ABOVE). Measured on the
# classroom model and its adapter, 60 test parts each at 64^3 and 128^3 and 8 at 256^3: the
# dense mesh every time, and still so with half the log margin and no dilation; coarse
# samples a whole texel apart missed parts of 25 of 60 meshes (benchmarks/bench_band.py).
SURFACE_LOG_MARGIN = 2.0
SURFACE_DILATION = 1
SURFACE_MAX_STEP = 4  # the widest coarse step measured


def surface_coarse_step(resolution: int, plane_size: int) -> int:
    """The band's coarse step in grid steps: the largest power of two within about half a
    texel of a plane_size triplane (5 % slack: 255 / 64 / 2 = 1.99 counts as 2), at most
    SURFACE_MAX_STEP. 1 means the band would query every point."""
    half_texel = (resolution - 1) / plane_size / 2 * 1.05
    step = 1
    while step * 2 <= min(half_texel, SURFACE_MAX_STEP):
        step *= 2
    return step


def surface_band(resolution: int, plane_size: int, threshold: float, method: str = "auto") -> dict:
    """tsr.mesh.extract_isosurface's settings for a TSR field: "auto" is "band" with the
    margins above, or "dense" where the band would query every point (a triplane too coarse
    for the grid) or cannot be drawn (a threshold <= 0); another method keeps the band's
    coarse step and margins for itself. -> method, coarse_step, margin, log_margin"""
    step = surface_coarse_step(resolution, plane_size)
    if method == "auto":
        method = "band" if step > 1 and threshold > 0 else "dense"
    log_margin = SURFACE_LOG_MARGIN if threshold > 0 else None
    return {
        "method": method,
        "coarse_step": step,
        "margin": SURFACE_DILATION,
        "log_margin": log_margin,
    }


class TSR(nn.Module):
    def __init__(self, config: TSRConfig):
        super().__init__()
        self.config = config
        self.image_tokenizer = DINOSingleImageTokenizer(config.image_tokenizer)
        self.tokenizer = Triplane1DTokenizer(config.tokenizer)
        self.backbone = Transformer1D(config.backbone)
        self.post_processor = TriplaneUpsampleNetwork(config.post_processor)
        self.decoder = NeRFMLP(config.decoder)
        self.renderer = TriplaneNeRFRenderer(config.renderer)
        self.source = "random init"  # where the weights came from, for metadata

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: TSRConfig | str | os.PathLike, seed: int = 0) -> TSR:
        """A randomly initialised model: `"tiny"`, `"official"`, a config path or object."""
        if isinstance(config, str) and not config.endswith((".yaml", ".yml")):
            config = named_config(config)
        elif not isinstance(config, TSRConfig):
            config = load_config(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(config)
        model.source = f"random init (seed {seed})"
        return model.eval()

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        config_name: str = "config.yaml",
        weight_name: str = "model.ckpt",
    ) -> TSR:
        """Load weights strictly from a folder, a shipped name (`"tiny"`) or a Hub repo id."""
        config_path, weight_path = resolve_model_files(
            pretrained_model_name_or_path, config_name, weight_name
        )
        config = load_config(config_path)
        with torch.device("meta"):  # no time spent on a random init that is overwritten
            model = cls(config)
        state = read_state_dict(weight_path)
        check_state_dict(model.state_dict(), state, str(weight_path), str(config_path))
        check_finite(state, weight_path)
        model.load_state_dict(state, strict=True, assign=True)
        model.image_tokenizer.register_normalisation()  # buffers are not in checkpoints
        model.source = str(pretrained_model_name_or_path)
        return model.eval()

    def save_pretrained(self, folder: str | os.PathLike, safe_serialization: bool = True) -> Path:
        """Write config.yaml and model.safetensors (or model.ckpt), loadable by from_pretrained."""
        from safetensors.torch import save_file

        folder = Path(folder)
        write_text(folder / "config.yaml", self.config.to_yaml())
        state = {key: value.contiguous() for key, value in self.state_dict().items()}
        if safe_serialization:
            with atomic_path(folder / "model.safetensors") as path:
                save_file(state, str(path))
        else:
            save_torch(state, folder / "model.ckpt")
        return folder

    def weights_fingerprint(self) -> str:
        """A short hash of every byte of the base weights (names, shapes and values as float32),
        so an adapter can tell which model it was made for. SHA-256 (hardware-accelerated on
        most CPUs) per tensor, tensors in parallel threads (hashlib releases the GIL), then a
        hash of those digests."""
        tensors = sorted((k, v) for k, v in self.state_dict().items() if "lora_" not in k)
        with ThreadPoolExecutor() as pool:
            digests = pool.map(lambda item: _tensor_digest(*item), tensors)
            return hashlib.sha256(b"".join(digests)).hexdigest()[:16]

    # ---- image -> scene codes ----------------------------------------------------------
    def encode(self, rgb_cond: torch.Tensor) -> torch.Tensor:
        """Prepared images (B, H, W, 3) in [0, 1] -> scene codes (B, 3, C, 2P, 2P)."""
        image_tokens = self.image_tokenizer(rearrange(rgb_cond, "b h w c -> b c h w"))  # (B, Cv, M)
        tokens = self.tokenizer(rgb_cond.shape[0])  # (B, C, 3*P*P)
        tokens = self.backbone(tokens, rearrange(image_tokens, "b c m -> b m c"))
        return self.post_processor(self.tokenizer.detokenize(tokens))

    def forward(
        self, images: ImageLike | Sequence[ImageLike], device: str | torch.device | None = None
    ) -> torch.Tensor:
        """PIL images (RGB, or RGBA composited on grey), uint8 HWC arrays or float tensors,
        one or a list -> scene codes (B, 3, C, 2P, 2P)."""
        device = device or next(self.parameters()).device
        rgb_cond = prepare_images(images, self.config.cond_image_size).to(device)
        return self.encode(rgb_cond)

    # ---- scene codes -> pictures and meshes ----------------------------------------------
    def render_rays(
        self, scene_code: torch.Tensor, rays_o: torch.Tensor, rays_d: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Differentiable: one scene's rays (..., 3) -> rgb, opacity, depth (..., 3/1/1)."""
        return self.renderer.render_rays(self.decoder, scene_code, rays_o, rays_d)

    def render_cameras(
        self,
        scene_code: torch.Tensor,
        c2w: torch.Tensor,
        fovy_deg: float,
        height: int,
        width: int,
        ray_chunk: int = RAY_CHUNK,
    ) -> dict[str, torch.Tensor]:
        """One scene (3, C, H', W') seen from cameras c2w (V, 4, 4), in chunks of `ray_chunk`
        rays so memory stays bounded at any image size. Differentiable (wrap in no_grad to
        preview). -> rgb (V, H, W, 3), opacity (V, H, W, 1), depth (V, H, W, 1) on the scene
        code's device"""
        device = scene_code.device
        rays_o, rays_d = rays_from_c2w(c2w.to(device, torch.float32), height, width, fovy_deg)
        rays_o, rays_d = rays_o.reshape(-1, 3), rays_d.reshape(-1, 3)  # (V*H*W, 3)
        chunks = [
            self.render_rays(scene_code, rays_o[i : i + ray_chunk], rays_d[i : i + ray_chunk])
            for i in range(0, len(rays_o), ray_chunk)
        ]
        return {
            key: torch.cat([chunk[key] for chunk in chunks]).reshape(len(c2w), height, width, -1)
            for key in chunks[0]
        }

    @torch.no_grad()
    def render(
        self,
        scene_codes: torch.Tensor,
        n_views: int,
        elevation_deg: float = 0.0,
        camera_distance: float = CAMERA_DISTANCE,
        fovy_deg: float = FOVY_DEG,
        height: int = 256,
        width: int = 256,
        return_type: str = "pil",
    ) -> list[list]:
        """Views on an orbit, for each scene: a list (scenes) of lists (views) of images."""
        if return_type not in ("pil", "np", "pt"):
            raise ValueError(f"return_type must be 'pil', 'np' or 'pt', not {return_type!r}")
        c2w = orbit_cameras(n_views, elevation_deg, camera_distance)
        scenes = []
        for scene_code in scene_codes:
            rgb = self.render_cameras(scene_code, c2w, fovy_deg, height, width)["rgb"]
            scenes.append([_convert_image(view.float().cpu(), return_type) for view in rgb])
        return scenes

    @torch.no_grad()
    def extract_mesh(
        self,
        scene_codes: torch.Tensor,
        has_vertex_color: bool = True,
        resolution: int = 256,
        threshold: float | None = None,
        method: str = "auto",
        backend: str = "auto",
        chunk_size: int | None = mesh_extraction.DEFAULT_CHUNK_SIZE,
    ) -> list[trimesh.Trimesh]:
        """Marching cubes on density_act = threshold, one mesh per scene.

        threshold None uses the model config's (25.0 for the official model). `method`:
        "dense" (the official grid), "band" (queries only near the surface, with the margins
        above), "coarse_to_fine" (only near sign changes: may drop small parts), "blocks"
        (bounded memory for 512+), "auto" ("band", or "dense" where the triplane is too
        coarse for the grid to leave points out; in blocks when the volume is big). A proof
        that "band" equals "dense" would need a bound on the decoder's slope; the provable
        ones are thousands of times its real slope, so the margins are measured instead (the
        dense mesh is one flag away). `chunk_size` is points per grid query;
        `renderer.set_chunk_size` splits them further. A long extraction shows a progress bar
        and warns first with its estimated time and memory.
        """
        threshold = self.config.mc_threshold if threshold is None else threshold
        meshes = []
        for scene_code in scene_codes:

            def density(points: torch.Tensor, code: torch.Tensor = scene_code) -> torch.Tensor:
                return self.renderer.query_triplane(self.decoder, points, code)["density_act"][:, 0]

            def color(points: torch.Tensor, code: torch.Tensor = scene_code) -> torch.Tensor:
                return self.renderer.query_triplane(self.decoder, points, code)["color"]

            extraction = mesh_extraction.extract_isosurface(
                density,
                resolution=resolution,
                threshold=threshold,
                radius=self.config.renderer.radius,
                chunk_size=chunk_size,
                backend=backend,
                device=scene_code.device,
                **surface_band(resolution, scene_code.shape[-1], threshold, method),
            )
            meshes.append(
                mesh_extraction.build_trimesh(
                    extraction.verts,
                    extraction.faces,
                    color if has_vertex_color else None,
                    device=scene_code.device,
                )
            )
        return meshes


def _tensor_digest(name: str, tensor: torch.Tensor) -> bytes:
    digest = hashlib.sha256(f"{name}{tuple(tensor.shape)}".encode())
    digest.update(tensor.detach().float().cpu().contiguous().numpy().data)
    return digest.digest()


def _convert_image(rgb: torch.Tensor, return_type: str) -> Image.Image | np.ndarray | torch.Tensor:
    if return_type == "pt":
        return rgb
    array = rgb.clamp(0, 1).numpy()
    if return_type == "np":
        return array
    return Image.fromarray((array * 255.0).round().astype(np.uint8))
