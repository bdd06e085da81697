"""Backbone: a 1D transformer over triplane tokens that cross-attends to image tokens.

Module names follow TripoSR (`transformer_blocks.N.attn1.to_q`, ...), so the official
checkpoint loads by name and LoRA targets resolve to the same 128 Linear layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import BackboneConfig


class Attention(nn.Module):
    """Multi-head attention; self-attention when no context is given."""

    def __init__(self, query_dim: int, heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * head_dim
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        # `to_out.0` / `to_out.1` are the checkpoint's names for the projection and dropout.
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(0.0)])

    def forward(self, hidden: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = hidden if context is None else context  # (B, N, C) / (B, M, Cc)
        q, k, v = (
            rearrange(x, "b n (h d) -> b h n d", h=self.heads)
            for x in (self.to_q(hidden), self.to_k(context), self.to_v(context))
        )
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim)
        out = rearrange(out, "b h n d -> b n (h d)")
        return self.to_out[1](self.to_out[0](out))


class GEGLU(nn.Module):
    """Linear to twice the width, split into (x, gate), x * gelu(gate) (exact erf GELU)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(hidden).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # Stored as `ff.net.0.proj`, `ff.net.2` in the checkpoint; net.1 is a dropout.
        self.net = nn.Sequential(
            GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention, cross-attention to the image, GEGLU MLP."""

    def __init__(self, dim: int, heads: int, head_dim: int, cross_attention_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=cross_attention_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, hidden: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.attn1(self.norm1(hidden))  # (B, N, D)
        hidden = hidden + self.attn2(self.norm2(hidden), image_tokens)
        return hidden + self.ff(self.norm3(hidden))


class Transformer1D(nn.Module):
    """Triplane tokens (B, C, N) + image tokens (B, M, Cc) -> updated tokens (B, C, N)."""

    def __init__(self, config: BackboneConfig):
        super().__init__()
        inner = config.num_attention_heads * config.attention_head_dim
        self.norm = nn.GroupNorm(config.norm_num_groups, config.in_channels, eps=1e-6)
        self.proj_in = nn.Linear(config.in_channels, inner)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(
                inner,
                config.num_attention_heads,
                config.attention_head_dim,
                config.cross_attention_dim,
            )
            for _ in range(config.num_layers)
        )
        self.proj_out = nn.Linear(inner, config.in_channels)
        # Recompute each block's activations in backward instead of storing them: the
        # full-size backbone keeps ~16 x 3072 x 8192 floats per image otherwise.
        self.gradient_checkpointing = False

    def forward(self, tokens: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        residual = tokens  # matches TripoSR: the residual skips the GroupNorm
        hidden = rearrange(self.norm(tokens), "b c n -> b n c")
        hidden = self.proj_in(hidden)  # (B, N, D)
        for block in self.transformer_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                hidden = checkpoint(block, hidden, image_tokens, use_reentrant=False)
            else:
                hidden = block(hidden, image_tokens)
        hidden = self.proj_out(hidden)
        return rearrange(hidden, "b n c -> b c n") + residual
