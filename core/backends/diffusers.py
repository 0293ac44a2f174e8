"""Backend over a diffusers ``UNet2DConditionModel`` (CLI, tests, the shipped tiny model).

Hooks are attention processors installed only on the sites a pass names and restored in a
``finally`` block, so the UNet is unchanged after every call.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ..attention import merge_heads, split_heads
from ..backend import AttentionFn, Conditioning, OutputFn, PassHooks
from ..errors import EmergentSegError, UnsupportedModelError
from ..sites import AttentionSite


def sd_alphas_cumprod(steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion's "scaled_linear" DDPM schedule, float64."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def unet_sites(unet: torch.nn.Module) -> tuple[list[AttentionSite], dict[str, torch.nn.Module], int]:
    """Walk a diffusers UNet's blocks in execution order.

    Returns the sites, the ``Attention`` module of each site key, and the UNet's total
    downsampling factor. Strides come from the model's own down/upsamplers, never from a
    hard-coded 512 px table.
    """
    if not all(hasattr(unet, a) for a in ("down_blocks", "mid_block", "up_blocks")):
        raise UnsupportedModelError(f"{type(unet).__name__} is not a UNet with down/mid/up blocks; "
                                    "emergent-seg needs an SD1.x/SD2.x/SDXL-style UNet")
    sites: list[AttentionSite] = []
    modules: dict[str, torch.nn.Module] = {}
    stride = 1

    def visit(prefix: str, block: torch.nn.Module, stage: str, index: int) -> None:
        for j, transformer in enumerate(getattr(block, "attentions", None) or []):
            for d, tb in enumerate(getattr(transformer, "transformer_blocks", [])):
                for name, kind in (("attn1", "self"), ("attn2", "cross")):
                    attn = getattr(tb, name, None)
                    if attn is None:
                        continue
                    if kind == "self" and getattr(attn, "is_cross_attention", False):
                        continue
                    key = f"{prefix}.attentions.{j}.transformer_blocks.{d}.{name}"
                    sites.append(AttentionSite(key, kind, stride, int(attn.heads), len(sites), stage,
                                               counters[stage], d))
                    modules[key] = attn
            counters[stage] += 1

    counters = {"down": 0, "mid": 0, "up": 0}
    for i, block in enumerate(unet.down_blocks):
        visit(f"down_blocks.{i}", block, "down", i)
        if getattr(block, "downsamplers", None):
            stride *= 2
    total = stride
    if unet.mid_block is not None:
        visit("mid_block", unet.mid_block, "mid", 0)
    for i, block in enumerate(unet.up_blocks):
        visit(f"up_blocks.{i}", block, "up", i)
        if getattr(block, "upsamplers", None):
            stride //= 2
    return sites, modules, total


class _SiteProcessor:
    """Plain attention (same maths as diffusers' AttnProcessor2_0 for UNet transformer blocks)
    with the pass's hooks at one site."""

    def __init__(self, site: AttentionSite, attention: AttentionFn | None, output: OutputFn | None) -> None:
        self.site, self.attention, self.output = site, attention, output

    def __call__(self, attn: torch.nn.Module, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **kwargs: object) -> torch.Tensor:
        if attention_mask is not None or attn.group_norm is not None or attn.spatial_norm is not None \
                or attn.residual_connection or attn.norm_cross or hidden_states.ndim != 3:
            raise UnsupportedModelError(f"attention at {self.site.key} uses masks or norms the "
                                        "pack does not support")
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        if self.attention is not None:
            out = self.attention(self.site, q, k, v)
        else:
            h = attn.heads
            out = merge_heads(F.scaled_dot_product_attention(split_heads(q, h), split_heads(k, h),
                                                             split_heads(v, h)))
        out = attn.to_out[1](attn.to_out[0](out))
        if self.output is not None:
            out = self.output(self.site, out)
        return out / attn.rescale_output_factor


class DiffusersBackend:
    """:class:`core.backend.Backend` over a diffusers ``UNet2DConditionModel``.

    Args:
        unet: the UNet (any SD1.x/SD2.x/SDXL layout, or a tiny one with the same block types).
        vae: an ``AutoencoderKL``; ``None`` = pixel-space model (latent = 2*image - 1).
        encode_prompt: ``prompt -> Conditioning`` (batch 1); the empty prompt is DiffSeg's default.
        alphas_cumprod: the DDPM schedule; default SD's scaled-linear 1000-step schedule.
        prediction_type: "epsilon" or "v_prediction".
        scaling_factor: latent scaling (default: ``vae.config.scaling_factor``).
    """

    def __init__(self, unet: torch.nn.Module, vae: torch.nn.Module | None = None,
                 encode_prompt: Callable[[str], Conditioning] | None = None,
                 alphas_cumprod: torch.Tensor | None = None, prediction_type: str = "epsilon",
                 scaling_factor: float | None = None) -> None:
        self.unet, self.vae = unet, vae
        self._sites, self._modules, self._total_down = unet_sites(unet)
        if not self._sites:
            raise UnsupportedModelError("this UNet has no attention layers; DiffSeg and EmerDiff "
                                        "need an SD-family UNet with transformer blocks")
        self._encode_prompt = encode_prompt
        self._alphas = (alphas_cumprod if alphas_cumprod is not None else sd_alphas_cumprod()).double()
        if prediction_type not in ("epsilon", "v_prediction"):
            raise EmergentSegError(f"unsupported prediction type {prediction_type!r}")
        self.prediction_type = prediction_type
        if vae is not None:
            self.latent_scale = 2 ** (len(vae.config.block_out_channels) - 1)
            self.scaling_factor = float(scaling_factor if scaling_factor is not None else vae.config.scaling_factor)
        else:
            self.latent_scale = 1
            self.scaling_factor = 1.0
        self._empty: Conditioning | None = None
        #: Measured defaults stored beside the model (``emergent_seg.json["calibration"]``: native
        #: size, tau, EmerDiff K, mapper settings); empty for a user's model = the papers' values.
        self.calibration: dict = {}

    # --- Backend protocol -------------------------------------------------------------------
    def sites(self) -> list[AttentionSite]:
        return list(self._sites)

    def size_multiple(self) -> int:
        return self.latent_scale * self._total_down

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, torch.float32) * 2 - 1
        if self.vae is None:
            return x.to(self.dtype)
        with torch.no_grad():
            vae_dtype = next(self.vae.parameters()).dtype
            latent = self.vae.encode(x.to(vae_dtype)).latent_dist.mean
        return (latent * self.scaling_factor).to(self.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            x = latents.float()
        else:
            with torch.no_grad():
                vae_dtype = next(self.vae.parameters()).dtype
                x = self.vae.decode((latents / self.scaling_factor).to(vae_dtype)).sample.float()
        return ((x + 1) / 2).clamp(0, 1)

    def encode_prompt(self, prompt: str) -> Conditioning:
        if self._encode_prompt is None:
            raise EmergentSegError("this model was loaded without a text encoder; pass no prompt "
                                   "or load a model folder that includes one")
        return self._encode_prompt(prompt)

    def empty_conditioning(self) -> Conditioning:
        if self._empty is None:
            if self._encode_prompt is not None:
                self._empty = self._encode_prompt("")
            else:
                dim = int(self.unet.config.cross_attention_dim)
                self._empty = Conditioning(torch.zeros(1, 77, dim, device=self.device, dtype=self.dtype))
        return self._empty

    def alphas_cumprod(self) -> torch.Tensor:
        return self._alphas

    def predict_noise(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                      hooks: PassHooks | None = None) -> torch.Tensor:
        cond = cond.expand(latents.shape[0])
        extra = {k: v.to(self.device) for k, v in cond.extra.items()}
        if getattr(self.unet.config, "addition_embed_type", None) == "text_time" and "time_ids" not in extra:
            # SDXL micro-conditioning: original size, crop (0, 0), target size = the image size.
            h, w = (int(d) * self.latent_scale for d in latents.shape[-2:])
            extra["time_ids"] = torch.tensor([[h, w, 0, 0, h, w]], dtype=self.dtype,
                                             device=self.device).expand(latents.shape[0], 6)
        extra = extra or None
        with self.hooked(hooks or PassHooks()), torch.no_grad():
            out = self.unet(latents.to(self.device, self.dtype), timesteps.to(self.device),
                            encoder_hidden_states=cond.context.to(self.device, self.dtype),
                            added_cond_kwargs=extra).sample
        if self.prediction_type == "v_prediction":
            a = self._alphas.to(out.device)[timesteps.to(out.device)].float().view(-1, 1, 1, 1)
            out = a.sqrt() * out + (1 - a).sqrt() * latents.to(out.dtype)
        return out

    # --- hooks ------------------------------------------------------------------------------
    @contextmanager
    def hooked(self, hooks: PassHooks) -> Iterator[None]:
        """Install processors on the sites ``hooks`` names; restore the originals afterwards."""
        unknown = (hooks.attention.keys() | hooks.output.keys()) - self._modules.keys()
        if unknown:
            raise EmergentSegError(f"unknown attention sites: {sorted(unknown)[:3]}")
        saved: dict[str, object] = {}
        try:
            for key in hooks.attention.keys() | hooks.output.keys():
                module = self._modules[key]
                site = next(s for s in self._sites if s.key == key)
                saved[key] = module.processor
                module.set_processor(_SiteProcessor(site, hooks.attention.get(key), hooks.output.get(key)))
            yield
        finally:
            for key, processor in saved.items():
                self._modules[key].set_processor(processor)
