"""Image tokenizer: a DINO ViT-B/16 turns the conditioning image into tokens.

`image_tokenizer.model` is a transformers `ViTModel` built from its config (the weights come
from the TripoSR checkpoint), so the checkpoint's 4.x parameter names load unchanged.
"""

from __future__ import annotations

import math
import types

import torch
from torch import nn
from transformers import ViTConfig, ViTModel

from .config import ImageTokenizerConfig


def _dino_interpolate_pos_encoding(
    embeddings_module: nn.Module, embeddings: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """Position embeddings resized to the patch grid, as transformers 4.35 computed them.

    matches TripoSR: the weights were trained with these numbers. transformers >= 4.42 resizes
    to an exact `size=(h, w)`; 4.35 passed DINO's `scale_factor = (h + 0.1) / grid`, which
    samples the grid at slightly different points (mean |diff| ~0.036 on unit embeddings).
    embeddings (B, 1 + h*w, C) -> (1, 1 + h*w, C)
    """
    position_embeddings = embeddings_module.position_embeddings  # (1, 1 + g*g, C)
    num_patches = embeddings.shape[1] - 1
    num_positions = position_embeddings.shape[1] - 1
    if num_patches == num_positions and height == width:
        return position_embeddings
    patch_size = embeddings_module.patch_size
    grid = int(math.sqrt(num_positions))
    dim = embeddings.shape[-1]
    h, w = height // patch_size, width // patch_size
    patch_grid = position_embeddings[:, 1:].reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
    patch_grid = nn.functional.interpolate(
        patch_grid,
        scale_factor=((h + 0.1) / grid, (w + 0.1) / grid),
        mode="bicubic",
        align_corners=False,
    )  # (1, C, h, w)
    if patch_grid.shape[-2:] != (h, w):
        raise RuntimeError(f"position grid resized to {tuple(patch_grid.shape[-2:])}, not {(h, w)}")
    patch_embeddings = patch_grid.permute(0, 2, 3, 1).reshape(1, h * w, dim)
    return torch.cat([position_embeddings[:, :1], patch_embeddings], dim=1)


class DINOSingleImageTokenizer(nn.Module):
    """(B, 3, H, W) images in [0, 1] -> image tokens (B, C_vit, 1 + (H/16)*(W/16))."""

    def __init__(self, config: ImageTokenizerConfig):
        super().__init__()
        vit_config = ViTConfig(**{k: v for k, v in config.vit.items() if k != "architectures"})
        self.model = ViTModel(vit_config, add_pooling_layer=True)  # pooler: in the ckpt, unused
        self.model.embeddings.interpolate_pos_encoding = types.MethodType(
            _dino_interpolate_pos_encoding, self.model.embeddings
        )
        self.register_normalisation()

    def register_normalisation(self) -> None:
        """ImageNet statistics; not in the checkpoint (non-persistent), shaped (1, 1, 3, 1, 1)
        like the official buffers. Called again after a meta-device build, which leaves them empty.
        """
        mean = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 1, 3, 1, 1)
        self.register_buffer("image_mean", mean, persistent=False)
        self.register_buffer("image_std", std, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        normalised = (images - self.image_mean[0]) / self.image_std[0]  # (B, 3, H, W)
        hidden = self.model(pixel_values=normalised, interpolate_pos_encoding=True)
        return hidden.last_hidden_state.transpose(1, 2)  # (B, C, N)
