"""Load a model for the CLI: a diffusers folder, a single-file SD1.x ``.safetensors``, or the
shipped tiny fixture. Offline only (``local_files_only``); safetensors only, never pickle."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..backend import Conditioning
from ..errors import EmergentSegError
from .diffusers import DiffusersBackend, sd_alphas_cumprod

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CLIP_BOS, CLIP_EOS = 49406, 49407


def _schedule(folder: Path) -> tuple[torch.Tensor, str]:
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    if not cfg_path.exists():
        return sd_alphas_cumprod(), "epsilon"
    cfg = json.loads(cfg_path.read_text())
    steps = int(cfg.get("num_train_timesteps", 1000))
    start, end = float(cfg.get("beta_start", 0.00085)), float(cfg.get("beta_end", 0.012))
    kind = cfg.get("beta_schedule", "scaled_linear")
    if kind == "scaled_linear":
        alphas = sd_alphas_cumprod(steps, start, end)
    elif kind == "linear":
        alphas = torch.cumprod(1 - torch.linspace(start, end, steps, dtype=torch.float64), 0)
    else:
        raise EmergentSegError(f"unsupported beta schedule {kind!r} in {cfg_path}")
    return alphas, cfg.get("prediction_type", "epsilon")


def _need_transformers() -> object:
    try:
        import transformers
    except ImportError:
        raise EmergentSegError("this model's CLIP text encoder needs the transformers package; "
                               "install it with: pip install 'emergent-seg[sd]'") from None
    return transformers


def _clip_prompt_encoder(folder: Path, device: torch.device, dtype: torch.dtype):
    """Prompt -> Conditioning for SD1.x/SD2.x folders, or SDXL folders with two encoders."""
    tf = _need_transformers()
    tok1 = tf.CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    enc1 = tf.CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True).to(device, dtype).eval()
    xl = (folder / "text_encoder_2").exists()
    if xl:
        tok2 = tf.CLIPTokenizer.from_pretrained(folder / "tokenizer_2", local_files_only=True)
        enc2 = tf.CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2",
                                                              local_files_only=True).to(device, dtype).eval()

    def encode(prompt: str) -> Conditioning:
        ids = tok1(prompt, padding="max_length", max_length=tok1.model_max_length, truncation=True,
                   return_tensors="pt").input_ids
        tokens = tuple(tok1.convert_ids_to_tokens(ids[0].tolist()))
        with torch.no_grad():
            if not xl:
                context = enc1(ids.to(device)).last_hidden_state
                return Conditioning(context, {}, tokens, prompt)
            h1 = enc1(ids.to(device), output_hidden_states=True).hidden_states[-2]
            ids2 = tok2(prompt, padding="max_length", max_length=tok2.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
            out2 = enc2(ids2, output_hidden_states=True)
        return Conditioning(torch.cat([h1, out2.hidden_states[-2]], dim=-1), {"text_embeds": out2.text_embeds},
                            tokens, prompt)
    return encode


def load_diffusers_folder(folder: Path, device: torch.device, dtype: torch.dtype) -> DiffusersBackend:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True).to(device, dtype).eval()
    vae = None
    if (folder / "vae").exists():
        vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True).to(device, torch.float32).eval()
    alphas, prediction = _schedule(folder)
    encode = _clip_prompt_encoder(folder, device, dtype) if (folder / "text_encoder").exists() else None
    return DiffusersBackend(unet, vae, encode, alphas, prediction)


def load_single_file_sd15(path: Path, device: torch.device, dtype: torch.dtype) -> DiffusersBackend:
    """An original-format SD1.x ``.safetensors`` (UNet + VAE + CLIP-L), using the shipped configs.
    Without a tokenizer only the empty prompt (DiffSeg's default) is available: its token ids are
    fixed (BOS then EOS padding), so no vocabulary is needed."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file

    cfg = str(CONFIGS / "sd15")
    unet = UNet2DConditionModel.from_single_file(str(path), config=cfg, subfolder="unet",
                                                 local_files_only=True).to(device, dtype).eval()
    vae = AutoencoderKL.from_single_file(str(path), config=cfg, subfolder="vae",
                                         local_files_only=True).to(device, torch.float32).eval()
    tf = _need_transformers()
    prefix = "cond_stage_model.transformer."
    state = {k[len(prefix):]: v for k, v in load_file(str(path)).items() if k.startswith(prefix)}
    if not state:
        raise EmergentSegError(f"{path} has no SD1.x CLIP text encoder (cond_stage_model); "
                               "use a diffusers folder for SD2.x/SDXL models")
    config = tf.CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                               num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                               hidden_act="quick_gelu", projection_dim=768)
    text = tf.CLIPTextModel(config)
    text.load_state_dict(state, strict=False)
    text = text.to(device, dtype).eval()

    def encode(prompt: str) -> Conditioning:
        if prompt:
            raise EmergentSegError("prompts need a tokenizer, which a single-file checkpoint lacks; "
                                   "use a diffusers folder, or no prompt")
        ids = torch.tensor([[CLIP_BOS] + [CLIP_EOS] * 76], device=device)
        with torch.no_grad():
            context = text(ids).last_hidden_state
        return Conditioning(context, {}, ("<|startoftext|>",) + ("<|endoftext|>",) * 76, "")
    return DiffusersBackend(unet, vae, encode)


def load_backend(model: str | Path | None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> DiffusersBackend:
    """``None`` = the shipped tiny fixture; a folder = diffusers layout; a file = SD1.x safetensors."""
    device = torch.device(device)
    if model is None:
        try:
            from ...fixture.backend import load_fixture_backend
            return load_fixture_backend(device=device)
        except (ImportError, FileNotFoundError) as exc:
            raise EmergentSegError("no --model given and the embedded default model is not available "
                                   f"({exc}); pass --model PATH to a diffusers folder or .safetensors") from None
    path = Path(model).expanduser()
    if not path.exists():
        raise EmergentSegError(f"model {path} does not exist; pass a diffusers folder or a .safetensors file")
    if path.is_dir():
        if not (path / "unet").exists():
            raise EmergentSegError(f"{path} is not a diffusers model folder (no unet/ inside)")
        return load_diffusers_folder(path, device, dtype)
    if path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        raise EmergentSegError(f"{path.name} is a pickle checkpoint, which is never loaded for safety; "
                               "convert it to .safetensors")
    if path.suffix.lower() != ".safetensors":
        raise EmergentSegError(f"{path.name}: expected a .safetensors file or a diffusers folder")
    return load_single_file_sd15(path, device, dtype)
