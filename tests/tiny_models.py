"""Tiny randomly initialised UNets with the real SD block layouts (plumbing tests only)."""
from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from emergent_seg.core.backend import Conditioning
from emergent_seg.core.backends.diffusers import DiffusersBackend


def tiny_sd15_unet(seed: int = 0, context_dim: int = 16) -> UNet2DConditionModel:
    """SD1.x layout: 4 resolutions, 16 transformer blocks (down 2+2+2, mid 1, up 3+3+3)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(16, 16, 32, 32), norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=context_dim, attention_head_dim=4,
    ).eval()


def tiny_sdxl_unet(seed: int = 0, context_dim: int = 16) -> UNet2DConditionModel:
    """SDXL layout: no attention at the top level, 2 and 3 transformer blocks per level below."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(16, 16, 32), norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 3), cross_attention_dim=context_dim,
        attention_head_dim=4, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + context_dim,
    ).eval()


def random_conditioning(unet: UNet2DConditionModel, tokens: int = 77, seed: int = 1) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    dim = int(unet.config.cross_attention_dim)
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        extra = {"text_embeds": torch.randn(1, dim, generator=g),
                 "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
    return Conditioning(torch.randn(1, tokens, dim, generator=g), extra)


def tiny_backend(layout: str = "sd15", seed: int = 0) -> DiffusersBackend:
    unet = tiny_sd15_unet(seed) if layout == "sd15" else tiny_sdxl_unet(seed)
    cond = random_conditioning(unet)
    return DiffusersBackend(unet, encode_prompt=lambda prompt: cond)
