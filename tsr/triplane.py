"""Triplane stages: learned input tokens, the upsampler to scene codes, and the NeRF decoder."""

from __future__ import annotations

import itertools
import math

import torch
from einops import rearrange, repeat
from torch import nn

from .config import DecoderConfig, PostProcessorConfig, TriplaneTokenizerConfig


class Triplane1DTokenizer(nn.Module):
    """Three learned planes, flattened plane-major into one token sequence."""

    def __init__(self, config: TriplaneTokenizerConfig):
        super().__init__()
        self.plane_size = config.plane_size
        self.num_channels = config.num_channels
        shape = (3, config.num_channels, config.plane_size, config.plane_size)
        self.embeddings = nn.Parameter(torch.randn(shape) / math.sqrt(config.num_channels))

    def forward(self, batch_size: int) -> torch.Tensor:
        planes = repeat(self.embeddings, "np c h w -> b np c h w", b=batch_size)
        return rearrange(planes, "b np c h w -> b c (np h w)")  # (B, C, 3*P*P)

    def detokenize(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, C, 3*P*P) -> (B, 3, C, P, P)"""
        return rearrange(
            tokens, "b c (np h w) -> b np c h w", np=3, h=self.plane_size, w=self.plane_size
        )


class TriplaneUpsampleNetwork(nn.Module):
    """Each plane (C, P, P) -> scene code plane (C_out, 2P, 2P) by a stride-2 transposed conv."""

    def __init__(self, config: PostProcessorConfig):
        super().__init__()
        self.upsample = nn.ConvTranspose2d(
            config.in_channels, config.out_channels, kernel_size=2, stride=2
        )

    def forward(self, planes: torch.Tensor) -> torch.Tensor:
        batch = planes.shape[0]
        upsampled = self.upsample(rearrange(planes, "b np c h w -> (b np) c h w"))
        return rearrange(upsampled, "(b np) c h w -> b np c h w", b=batch)  # (B, 3, Co, 2P, 2P)


class NeRFMLP(nn.Module):
    """Triplane features (N, 3*C) -> raw (N, 4): density logit and 3 colour logits."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        if config.activation != "silu":
            raise ValueError(f"decoder activation {config.activation!r}: only 'silu' is built")
        widths = [config.in_channels] + [config.n_neurons] * config.n_hidden_layers
        layers: list[nn.Module] = []
        for width_in, width_out in itertools.pairwise(widths):
            layers += [nn.Linear(width_in, width_out), nn.SiLU()]
        layers.append(nn.Linear(config.n_neurons, 4))
        # Stored as `decoder.layers.{0,2,...}`: activations sit between the Linears.
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)
