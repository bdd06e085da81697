"""Model surgery for pretraining the classroom model from scratch (pretrain.py): the init,
a geometric cross-attention prior, and a colour path from the input to the scene code."""

from __future__ import annotations

import math

import torch

from tsr.cameras import CAMERA_DISTANCE, FOVY_DEG
from tsr.config import ASSETS, load_config
from tsr.model import TSR

CLASSROOM_CONFIG = ASSETS / "classroom-config.yaml"  # the architecture pretrain.py trains

# Fourier frequencies per image axis of the geometric lookup: it takes the first 4 x this
# many channels of the image and triplane tokens; the colour lookup's channels come after.
POSITION_FREQUENCIES = 8


def init_for_pretraining(
    model: TSR,
    cross_attention_gain: float,
    position_std: float,
    geometric_heads: int,
    colour_lookup: float = 0.0,
    seed: int = 0,
) -> None:
    """Init changes that let the image steer the triplane from step 1.

    The ViT's position embeddings start at transformers' std 0.02 against patch features of
    std ~0.5: image tokens say what a patch shows but not where it is, so no triplane token can
    look up "the patch at row 3, column 5". `position_std` makes position as loud as content.
    Then the query and key weights of every cross-attention are scaled by
    `cross_attention_gain`.
    `colour_lookup` > 0 builds a colour path with that amplitude (see `add_colour_lookup`).
    `seed` draws the position embeddings (from torch's global generator they would differ
    between processes: torch seeds it from the OS at start-up).

    With PyTorch's init the attention logits are so small that each triplane token sees the
    plain mean of the image tokens, mostly background: every object looks alike, and the model
    learns one mean shape and stays there (val PSNR flat at 12.4 dB from step 500 to 1500).
    Logits x16 let tokens pick image patches from the start: 18.2 dB instead of 14.6 dB after
    200 steps fitting 8 objects.

    Those tokens still do not know *which* patch is theirs, and training does not find out:
    in the earlier classroom model (16² planes, 4800 steps), a (y, z)-plane cell put 0.16-0.21
    of its attention on the 3x3 patches around the one it projects to, as uniform attention
    would (9/64 = 0.14). `geometric_heads` of each cross-attention start with that lookup built in
    (see `geometric_cross_attention`).
    """
    with torch.no_grad():
        model.image_tokenizer.model.embeddings.position_embeddings.normal_(
            0.0, position_std, generator=torch.Generator().manual_seed(seed)
        )
        for block in model.backbone.transformer_blocks:
            block.attn2.to_q.weight.mul_(cross_attention_gain)
            block.attn2.to_k.weight.mul_(cross_attention_gain)
    if geometric_heads:
        geometric_cross_attention(model, geometric_heads)
    if colour_lookup:
        add_colour_lookup(model, colour_lookup)


def _fourier(u: torch.Tensor, n_frequencies: int) -> torch.Tensor:
    """(...,) coordinates in ~[-1, 1] -> (..., 2F) features; f(u) . f(u') = mean cos(w (u - u')),
    1 at u = u' and small a patch or more away."""
    omega = torch.linspace(1.0, 3.0 * math.pi, n_frequencies)
    angles = u[..., None] * omega
    return torch.cat([angles.cos(), angles.sin()], dim=-1) / math.sqrt(n_frequencies)


def geometric_cross_attention(
    model: TSR,
    heads: int,
    amplitude: float = 3.0,
    gain: float = 3.0,
    n_frequencies: int = POSITION_FREQUENCIES,
) -> None:
    """Make triplane cells attend to the image patch they project to in the input view.

    The conditioning camera is fixed (view 0: distance 1.9, fovy 40, looking down -x, so image
    columns follow world y and rows follow -z). The first 2F channels of the ViT position
    embeddings become Fourier features of each patch's (row, column); the same channels of the
    triplane embeddings become Fourier features of where each cell projects: (row, column)
    for the (y, z) plane, the column alone for (x, y), the row alone for (x, z) (x is depth).
    `proj_in` passes those channels through unchanged, and the first `heads` heads of every
    cross-attention compare them (query and key += gain * identity): at init a cell then puts
    0.45-0.65 of those heads' attention within one patch of its own (0.14 if uniform). The
    other heads keep their content-based attention, and all of it stays trainable.

    Measured from scratch on 48 validation objects with the earlier 16^2-plane recipe: after
    450 steps occupancy BCE / IoU 0.491 / 0.428 with 2 geometric heads, 0.492 / 0.431 with all
    4, 0.501 / 0.414 with none; weaker features (amplitude 1, gain 2) were lost in the random
    logits (0.497 / 0.429), and all 4 heads without the other position channels was worse than
    none (0.518 / 0.349). After 1200 steps, Chamfer-L1 / F@0.05 0.0666 / 0.522 with 2 heads
    against 0.0673 / 0.504 without: a small gain, kept.
    """
    vit_embeddings = model.image_tokenizer.model.embeddings
    grid = math.isqrt(vit_embeddings.position_embeddings.shape[1] - 1)  # patches per side
    plane_size, radius = model.tokenizer.plane_size, model.renderer.config.radius
    width = 2 * n_frequencies  # channels per image axis
    # world length -> image coordinate in [-1, 1], for points at the origin's depth
    world_to_image = 1.0 / (math.tan(math.radians(FOVY_DEG) / 2) * CAMERA_DISTANCE)
    with torch.no_grad():
        patch_centres = (2 * torch.arange(grid) + 1) / grid - 1  # (g,), top/left = -1
        patch_features = _fourier(patch_centres, n_frequencies)  # (g, 2F)
        position = vit_embeddings.position_embeddings[0, 1:].view(grid, grid, -1)  # (g, g, C)
        position[..., :width] = amplitude * patch_features[:, None, :]  # row
        position[..., width : 2 * width] = amplitude * patch_features[None, :, :]  # column

        cell_centres = radius * ((2 * torch.arange(plane_size) + 1) / plane_size - 1)  # world
        column_of_y = amplitude * _fourier(cell_centres * world_to_image, n_frequencies).T
        row_of_z = amplitude * _fourier(-cell_centres * world_to_image, n_frequencies).T
        planes = model.tokenizer.embeddings  # (3, C, h, w): (x,y) h=y; (x,z) h=z; (y,z) h=z, w=y
        planes[:, : 2 * width] = 0
        planes[0, width : 2 * width] = column_of_y[:, :, None]
        planes[1, :width] = row_of_z[:, :, None]
        planes[2, :width] = row_of_z[:, :, None]
        planes[2, width : 2 * width] = column_of_y[:, None, :]

        backbone = model.backbone
        positional = 2 * width
        backbone.proj_in.weight[:positional] = 0
        backbone.proj_in.weight[:, :positional] = 0
        backbone.proj_in.weight[:positional, :positional] = torch.eye(positional)
        backbone.proj_in.bias[:positional] = 0
        for block in backbone.transformer_blocks:
            head_dim = block.attn2.to_q.weight.shape[0] // block.attn2.heads
            if head_dim < positional:
                raise ValueError(
                    f"geometric heads need head_dim >= {positional}: fewer frequencies"
                )
            for head in range(min(heads, block.attn2.heads)):
                rows = slice(head * head_dim, head * head_dim + positional)
                block.attn2.to_q.weight[rows, :positional] += gain * torch.eye(positional)
                block.attn2.to_k.weight[rows, :positional] += gain * torch.eye(positional)


def add_colour_lookup(
    model: TSR, amplitude: float = 3.0, first_channel: int = 4 * POSITION_FREQUENCIES
) -> None:
    """Give the scene code a path for the input's colour, from step 1.

    Trained without it, the classroom model rendered grey: a linear probe reads an object's
    hue from the ViT tokens (chromaticity error 0.11, grey 0.24), but not from the triplane
    tokens (0.18) or the scene code (0.27), and 18,000 steps of surface-colour loss never
    opened a way through (the decoded colour had R = G = B). So three channels, from
    `first_channel` on (past the geometric position channels), carry colour end to end at
    init: the patch embedding writes each patch's mean (normalised) R, G, B into them, the
    first head of every cross-attention reads them from the patch it looks up (its geometric
    lookup, see `geometric_cross_attention`) and writes them to the triplane token, which
    `proj_out` and the upsampler pass to the last 3 channels of each scene-code plane.
    Everything stays trainable, so the path lasts only if colour matters to the loss: at the
    colour weight of 1, 1200 steps had written over it; at 100 it carries the hue.
    """
    colour = slice(first_channel, first_channel + 3)
    vit = model.image_tokenizer.model.embeddings
    backbone = model.backbone
    upsample = model.post_processor.upsample  # ConvTranspose2d weight (C_in, C_out, 2, 2)
    code = slice(upsample.out_channels - 3, upsample.out_channels)
    blocks = backbone.transformer_blocks
    if min(block.attn2.to_v.weight.shape[0] // block.attn2.heads for block in blocks) < 3:
        raise ValueError("a colour lookup needs cross-attention heads of >= 3 channels")
    with torch.no_grad():
        patch = vit.patch_embeddings.projection  # Conv2d (C_vit, 3, p, p)
        patch.weight[colour] = 0
        patch.bias[colour] = 0
        for rgb in range(3):
            patch.weight[first_channel + rgb, rgb] = amplitude / patch.weight[0, 0].numel()
        vit.position_embeddings[..., colour] = 0
        vit.cls_token[..., colour] = 0
        # clean channels in the triplane stream: nothing but the looked-up colour at init
        model.tokenizer.embeddings[:, colour] = 0
        backbone.proj_in.weight[colour] = 0
        backbone.proj_in.bias[colour] = 0
        for block in blocks:
            attn = block.attn2
            attn.to_v.weight[:3] = 0  # head 0's first 3 value channels <- the patch colour
            attn.to_v.weight[:3, colour] = torch.eye(3)
            attn.to_out[0].weight[colour] = 0
            attn.to_out[0].weight[colour, :3] = torch.eye(3) / len(blocks)
            attn.to_out[0].bias[colour] = 0
        backbone.proj_out.weight[colour] = 0
        backbone.proj_out.weight[colour, colour] = torch.eye(3)
        backbone.proj_out.bias[colour] = 0
        upsample.weight[:, code] = 0
        upsample.weight[colour, code] = torch.eye(3)[:, :, None, None]
        upsample.bias[code] = 0


def pretraining_model(
    seed: int,
    cross_attention_gain: float,
    position_std: float,
    geometric_heads: int,
    colour_lookup: float,
) -> TSR:
    """The classroom architecture at its pretraining init; the same for the same seed, on
    every process."""
    model = TSR.from_config(load_config(CLASSROOM_CONFIG), seed=seed)
    init_for_pretraining(
        model, cross_attention_gain, position_std, geometric_heads, colour_lookup, seed
    )
    model.source = "classroom (pretrain.py)"
    return model
