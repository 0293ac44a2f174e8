"""A randomly initialised miniature SD (the embedded model's exact architecture) saved as a model
folder, for tests that need the real loading path but not trained weights."""
from __future__ import annotations

from pathlib import Path

import torch


def save_random_mini_sd(directory: Path, seed: int = 123, calibration: dict | None = None) -> Path:
    """Write ``directory`` (a diffusers folder like ``fixture/weights``) with seeded random weights.
    ``calibration`` goes to ``emergent_seg.json`` (default: only the native size)."""
    from diffusers import AutoencoderKL

    from emergent_seg.fixture.model import (NATIVE_SIZE, VAE_CONFIG, build_text_encoder, build_unet,
                                            save_unet_and_text, save_vae, write_record)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = build_unet()
        encoder, tokenizer = build_text_encoder()
        vae = AutoencoderKL(**VAE_CONFIG)
    save_vae(directory, vae)
    save_unet_and_text(directory, unet, encoder, tokenizer)
    write_record(directory, ("calibration",), dict(calibration or {"native_size": NATIVE_SIZE}))
    return directory
