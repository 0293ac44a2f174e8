"""Real-ComfyUI test support: host setup, random-weight models built from ComfyUI's own classes.

Nothing here is shipped. Every model has random weights: it tests plumbing, shapes and cost,
never segmentation quality.
"""
from __future__ import annotations

import os
import sys
import time

import pytest
import torch

COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")
SKIP_REASON = "COMFYUI_PATH is not set; point it at a ComfyUI checkout to run the real-host tests"
CACHE_DIR = os.environ.get("EMERGENT_SEG_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "emergent_seg"))
SD15_CHECKPOINT = os.path.join(CACHE_DIR, "sd15_random.safetensors")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def require_comfy() -> None:
    """Skip the calling test module unless a ComfyUI checkout is configured; otherwise put it on
    ``sys.path`` and force CPU before ``comfy.model_management`` is imported."""
    if not COMFYUI_PATH:
        pytest.skip(SKIP_REASON, allow_module_level=True)
    if not os.path.isfile(os.path.join(COMFYUI_PATH, "comfy", "model_management.py")):
        pytest.skip(f"COMFYUI_PATH={COMFYUI_PATH} is not a ComfyUI checkout", allow_module_level=True)
    if COMFYUI_PATH not in sys.path:
        sys.path.insert(0, COMFYUI_PATH)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401  (after args.cpu: no CUDA probe)


# --------------------------------------------------------------------------- model building


def reset_weights(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """ComfyUI's ``disable_weight_init`` ops leave weights uninitialised; give every layer
    torch's own default init, deterministically."""
    torch.manual_seed(seed)
    bases = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.GroupNorm,
             torch.nn.LayerNorm, torch.nn.Embedding)
    with torch.no_grad():
        for m in module.modules():
            for base in bases:
                if isinstance(m, base):
                    base.reset_parameters(m)
                    break
    return module


def sd15_unet_config(model_channels: int = 320, context_dim: int = 768, num_heads: int = 8) -> dict:
    """SD1.x UNet layout (ComfyUI ``model_detection``'s SD15 entry) with adjustable widths."""
    return {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
            "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": model_channels,
            "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
            "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
            "context_dim": context_dim, "num_heads": num_heads, "num_head_channels": -1,
            "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
            "use_temporal_attention": False, "use_temporal_resblock": False}


def tiny_sdxl_unet_config(model_channels: int = 32, context_dim: int = 64, pooled_dim: int = 32) -> dict:
    """SDXL layout (no attention at the top level; 2 and 3 transformer blocks per level below,
    ``transformer_depth`` [0,0,2,2,3,3] instead of [0,0,2,2,10,10]) at toy width."""
    return {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
            "legacy": False, "num_classes": "sequential", "adm_in_channels": pooled_dim + 6 * 256,
            "in_channels": 4, "model_channels": model_channels, "num_res_blocks": [2, 2, 2],
            "transformer_depth": [0, 0, 2, 2, 3, 3], "channel_mult": [1, 2, 4],
            "transformer_depth_middle": 3, "use_linear_in_transformer": True, "context_dim": context_dim,
            "num_head_channels": 16, "num_heads": -1,
            "transformer_depth_output": [0, 0, 0, 2, 2, 2, 3, 3, 3],
            "use_temporal_attention": False, "use_temporal_resblock": False}


def patcher_for(base_model: torch.nn.Module):
    import comfy.model_management as mm
    import comfy.model_patcher
    return comfy.model_patcher.ModelPatcher(base_model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def tiny_sd15_model(seed: int = 0, context_dim: int = 32):
    """ModelPatcher around ComfyUI's SD15 BaseModel with a 32-channel UNet (16 attention sites)."""
    import comfy.supported_models
    config = comfy.supported_models.SD15(sd15_unet_config(32, context_dim, 8))
    config.unet_config["num_heads"] = 8
    config.unet_config["num_head_channels"] = -1
    base = config.get_model({})
    reset_weights(base.diffusion_model, seed)
    return patcher_for(base.eval())


def tiny_sd2_vpred_model(seed: int = 0, context_dim: int = 32):
    """SD2.x-style (linear projections, 16-dim heads) v-prediction UNet at toy width."""
    import comfy.model_base
    import comfy.supported_models
    cfg = dict(sd15_unet_config(32, context_dim), use_linear_in_transformer=True)
    config = comfy.supported_models.SD20(cfg)
    config.unet_config.update(num_heads=-1, num_head_channels=16)
    base = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.V_PREDICTION)
    reset_weights(base.diffusion_model, seed)
    return patcher_for(base.eval())


def tiny_sdxl_model(seed: int = 0):
    import comfy.supported_models
    cfg = tiny_sdxl_unet_config()
    config = comfy.supported_models.SDXL(cfg)
    config.unet_config.update(num_head_channels=16, num_heads=-1)
    base = config.get_model({})
    reset_weights(base.diffusion_model, seed)
    return patcher_for(base.eval())


def build_random_sd15(path: str = SD15_CHECKPOINT, seed: int = 0) -> str:
    """Write a full-size random-weight SD1.5 checkpoint (UNet + VAE + CLIP-L, LDM key layout,
    fp16, about 2.1 GB) that ``CheckpointLoaderSimple`` detects as SD15. Cached: built once."""
    if os.path.isfile(path):
        return path
    import comfy.ldm.models.autoencoder
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.utils
    os.makedirs(os.path.dirname(path), exist_ok=True)
    t0 = time.time()
    config = comfy.supported_models.SD15(dict(sd15_unet_config(), dtype=torch.float32))
    base = config.get_model({})
    reset_weights(base.diffusion_model, seed)
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                "dropout": 0.0}
    vae = reset_weights(comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=ddconfig, embed_dim=4), seed + 1)
    clip = reset_weights(comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float32), seed + 2)
    clip_sd = clip.state_dict()
    clip_sd["clip_l.transformer.text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    sd = base.state_dict_for_saving(clip_sd, vae.state_dict())
    sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    tmp = path + ".partial"
    comfy.utils.save_torch_file(sd, tmp)
    os.replace(tmp, path)
    print(f"built {path}: {len(sd)} tensors in {time.time() - t0:.0f} s")
    return path


def load_sd15(path: str = SD15_CHECKPOINT):
    """``(model, clip, vae)`` as Load Checkpoint returns them."""
    import comfy.sd
    out = comfy.sd.load_checkpoint_guess_config(build_random_sd15(path), output_vae=True, output_clip=True)
    return out[0], out[1], out[2]


def ksampler_run(model, clip, size: int):
    """A function running one fixed KSampler call (seed 42, 1 euler step, CFG 7, "a photo" vs "")
    on ``model`` from an empty ``size`` px latent, returning its samples: call it before and after
    our nodes to prove the user's MODEL is unchanged."""
    import nodes as comfy_nodes  # ComfyUI's nodes.py
    pos = comfy_nodes.CLIPTextEncode().encode(clip, "a photo")[0]
    neg = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = {"samples": torch.zeros(1, 4, size // 8, size // 8)}

    def sample() -> torch.Tensor:
        return comfy_nodes.common_ksampler(model, 42, 1, 7.0, "euler", "normal", pos, neg, latent)[0]["samples"]
    return sample


def independent_top_level_mean(model, latents, cond_ctx, timestep):
    """The finest-grid self-attention of an SD1.x UNet computed independently of the pack: a plain
    UNet forward with pre-hooks on each finest-grid ``attn1.to_q`` that take the hidden states and
    compute softmax(q kᵀ/√d) from the module weights in float64; mean over heads and the 5 layers."""
    dm = model.model.diffusion_model
    blocks = [("input", 1), ("input", 2), ("output", 9), ("output", 10), ("output", 11)]
    seen, handles = [], []
    for name, idx in blocks:
        mod = (dm.input_blocks if name == "input" else dm.output_blocks)[idx]
        attn = [m for m in mod.modules() if m.__class__.__name__ == "BasicTransformerBlock"][0].attn1

        def pre(module, args, attn=attn):
            n = args[0]
            q = torch.nn.functional.linear(n, attn.to_q.weight, attn.to_q.bias)
            k = torch.nn.functional.linear(n, attn.to_k.weight, attn.to_k.bias)
            bsz, tokens, c = q.shape
            h = attn.heads
            q = q.view(bsz, tokens, h, c // h).transpose(1, 2).double()
            k = k.view(bsz, tokens, h, c // h).transpose(1, 2).double()
            probs = torch.softmax(q @ k.transpose(-1, -2) / (c // h) ** 0.5, dim=-1)
            seen.append(probs.mean(1))
        handles.append(attn.to_q.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            dm(latents, torch.full((latents.shape[0],), float(timestep)), context=cond_ctx,
               transformer_options={})
    finally:
        for hd in handles:
            hd.remove()
    assert len(seen) == 5
    return torch.stack(seen).mean(0)


if __name__ == "__main__":  # build the cached checkpoint: COMFYUI_PATH=... python tests/comfy/comfy_support.py
    if not COMFYUI_PATH:
        sys.exit(SKIP_REASON)
    sys.path.insert(0, COMFYUI_PATH)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    build_random_sd15()


def tiny_flux_model(seed: int = 0):
    """ModelPatcher around ComfyUI's Flux (dev layout: guidance embedding) at toy width: 2 double
    and 2 single blocks, 2 heads of 32 channels, 32-dim text context, 16-dim pooled vector."""
    import comfy.supported_models
    config = comfy.supported_models.Flux({
        "image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 16,
        "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 2,
        "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 10000, "qkv_bias": True,
        "guidance_embed": True})
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({})
    reset_weights(base.diffusion_model, seed)
    with torch.no_grad():                      # Flux's RMSNorm scales are left uninitialised too
        for name, param in base.diffusion_model.named_parameters():
            if name.endswith("norm.scale"):
                param.fill_(1.0)
    return patcher_for(base.eval())


def tiny_sd3_model(seed: int = 0):
    """ModelPatcher around ComfyUI's SD3 (MMDiT) at toy width: 2 joint blocks (hidden 128, 2
    heads), RMS q/k norms, and block 1 with SD3.5's extra image-only attention."""
    import comfy.supported_models
    config = comfy.supported_models.SD3({
        "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 2, "input_size": None,
        "adm_in_channels": 32, "num_patches": 256, "pos_embed_max_size": 16, "pos_embed_scaling_factor": None,
        "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 128}},
        "qk_norm": "rms", "x_block_self_attn_layers": [1]})
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({})
    net = reset_weights(base.diffusion_model, seed)
    with torch.no_grad():                      # left uninitialised by ComfyUI: norm scales, pos_embed
        for name, param in net.named_parameters():
            if name.endswith(("ln_q.weight", "ln_k.weight")):
                param.fill_(1.0)
        net.pos_embed.copy_(torch.randn(net.pos_embed.shape, generator=torch.Generator().manual_seed(seed)) * 0.02)
    return patcher_for(base.eval())


#: Where :func:`build_random_sd35` caches its checkpoint.
SD35_CHECKPOINT = os.path.join(CACHE_DIR, "sd35_random.safetensors")


def sd3_vae_model(seed: int = 0) -> torch.nn.Module:
    """Full-size SD3/Flux-style VAE (16 latent channels, no quant convs; 84 M parameters) with
    random weights, built as ``comfy.sd.VAE`` builds one for those keys. Its channel counts are
    fixed there (``ch`` 128, ``ch_mult`` 1-2-4-4), so it cannot be shrunk."""
    import comfy.ldm.models.autoencoder
    ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae = comfy.ldm.models.autoencoder.AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
        encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
        decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig})
    return reset_weights(vae, seed)


def build_random_sd35(path: str = SD35_CHECKPOINT, seed: int = 0) -> str:
    """Write a random-weight SD3.5 checkpoint that ``CheckpointLoaderSimple`` detects as SD3 (fp16,
    about 420 MB). Cached: built once.

    - MMDiT in SD3.5 Large's layout (RMS q/k norms, no image-only attention) at toy width:
      ComfyUI reads depth from the patch embedding (hidden = 64 * depth, one 64-channel head per
      block), so 4 joint blocks give hidden 256 and 4 heads; pos_embed covers 64x64 patches
      (1024 px). Context 4096 and pooled 2048 wide, as SD3's text encoders produce them.
    - CLIP-L only, at full size (its shape is fixed by ComfyUI's clip_config.json): with no
      clip_g or T5 in the file ComfyUI builds SD3's text encoder with clip_l alone and pads its
      output to 4096 (clip_g's pooled part is zeros). T5-XXL (4.7 B parameters) and CLIP-G
      (0.7 B) cannot be made small: their sizes are fixed too.
    - The full-size 16-channel VAE (:func:`sd3_vae_model`).
    """
    if os.path.isfile(path):
        return path
    import comfy.supported_models
    import comfy.text_encoders.sd3_clip
    import comfy.utils
    os.makedirs(os.path.dirname(path), exist_ok=True)
    t0 = time.time()
    depth = 4
    config = comfy.supported_models.SD3({
        "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": depth, "input_size": None,
        "adm_in_channels": 2048, "num_patches": 64 * 64, "pos_embed_max_size": 64, "pos_embed_scaling_factor": None,
        "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096,
                                                                            "out_features": 64 * depth}},
        "qk_norm": "rms", "x_block_self_attn_layers": []})
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({})
    net = reset_weights(base.diffusion_model, seed)
    with torch.no_grad():                      # left uninitialised by ComfyUI: norm scales, pos_embed
        for name, param in net.named_parameters():
            if name.endswith(("ln_q.weight", "ln_k.weight")):
                param.fill_(1.0)
        net.pos_embed.copy_(torch.randn(net.pos_embed.shape, generator=torch.Generator().manual_seed(seed)) * 0.02)
    clip_cls = comfy.text_encoders.sd3_clip.sd3_clip(clip_l=True, clip_g=False, t5=False)
    clip = reset_weights(clip_cls(device="cpu", dtype=torch.float32), seed + 2)
    sd = base.state_dict_for_saving(clip.state_dict(), sd3_vae_model(seed + 1).state_dict())
    sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    tmp = path + ".partial"
    comfy.utils.save_torch_file(sd, tmp)
    os.replace(tmp, path)
    print(f"built {path}: {len(sd)} tensors in {time.time() - t0:.0f} s")
    return path
