"""Load a model for the CLI: a diffusers folder, a single-file SD1.x ``.safetensors``, or the
embedded miniature SD (``fixture/weights``, itself an ordinary diffusers folder, loaded by the same
code). Offline only (``local_files_only``); safetensors only, never pickle: every library call asks
for safetensors (``use_safetensors=True``), and a folder that only has pickle weights is refused
with one line naming the file."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..backend import Conditioning
from ..errors import EmergentSegError
from .diffusers import DiffusersBackend, sd_alphas_cumprod

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CLIP_BOS, CLIP_EOS = 49406, 49407
#: The embedded miniature SD (a diffusers folder shipped inside the package).
EMBEDDED_MODEL = Path(__file__).resolve().parents[2] / "fixture" / "weights"
#: Optional file of a model folder with its measured defaults (see fixture/README.md).
DEFAULTS_FILE = "emergent_seg.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _pickle_refusal(folder: Path) -> EmergentSegError | None:
    """The one-line error for a component folder that holds pickle weights but no safetensors."""
    if any(folder.glob("*.safetensors")):
        return None
    pickles = sorted(p.name for p in folder.glob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
    if not pickles:
        return None
    return EmergentSegError(f"{folder / pickles[0]} is a pickle checkpoint, which is never loaded for safety; "
                            "convert it to safetensors (e.g. save_pretrained(..., safe_serialization=True))")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file, or one line saying why it cannot be read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise EmergentSegError(f"{path} is not a readable .safetensors file ({str(exc).splitlines()[0]}); "
                               "check the download or re-save it") from None


def _from_pretrained(cls: type, folder: Path, **kwargs: object) -> object:
    """``cls.from_pretrained(folder, use_safetensors=True, local_files_only=True)`` with one-line
    errors (pickle-only folder, missing or unreadable weights)."""
    refusal = _pickle_refusal(folder)
    if refusal is not None:
        raise refusal
    try:
        return cls.from_pretrained(folder, use_safetensors=True, local_files_only=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EmergentSegError(f"cannot load {cls.__name__} from {folder}: {first}") from None


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


def _clip_tokenizer(tf: object, folder: Path) -> object:
    """A CLIP BPE tokenizer built from its plain-text files (``vocab.json``, ``merges.txt``) and the
    settings in ``tokenizer_config.json``; nothing else in the folder is read."""
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if not vocab.exists() or not merges.exists():
        raise EmergentSegError(f"{folder} needs vocab.json and merges.txt (the CLIP tokenizer files)")
    settings: dict = {}
    config_path = folder / "tokenizer_config.json"
    if config_path.exists():
        try:
            config = json.loads(config_path.read_text())
        except ValueError:
            raise EmergentSegError(f"{config_path} is not valid JSON") from None
        for key in ("model_max_length", "pad_token", "bos_token", "eos_token", "unk_token", "errors"):
            value = config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if value is not None:
                settings[key] = value
    settings.setdefault("model_max_length", 77)
    return tf.CLIPTokenizer(vocab_file=str(vocab), merges_file=str(merges), **settings)


def _need_transformers() -> object:
    try:
        import transformers
    except ImportError:
        raise EmergentSegError("this model's CLIP text encoder needs the transformers package; "
                               "install it with: pip install 'emergent-seg[sd]'") from None
    return transformers


def _clip_prompt_encoder(folder: Path, device: torch.device, dtype: torch.dtype):
    """Prompt -> Conditioning for SD1.x/SD2.x folders, or SDXL folders with two encoders."""
    xl = (folder / "text_encoder_2").exists()
    for name in ("text_encoder", "text_encoder_2") if xl else ("text_encoder",):
        refusal = _pickle_refusal(folder / name)
        if refusal is not None:  # refused before anything else is asked for
            raise refusal
    tf = _need_transformers()
    tok1 = _clip_tokenizer(tf, folder / "tokenizer")
    enc1 = _from_pretrained(tf.CLIPTextModel, folder / "text_encoder").to(device, dtype).eval()
    if xl:
        tok2 = _clip_tokenizer(tf, folder / "tokenizer_2")
        enc2 = _from_pretrained(tf.CLIPTextModelWithProjection, folder / "text_encoder_2").to(device, dtype).eval()

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


def _word_prompt_encoder(folder: Path, device: torch.device, dtype: torch.dtype):
    """Prompt -> Conditioning for a folder whose text encoder is the word-level one
    (``text_encoder/config.json`` ``"_class_name": "WordTextEncoder"``; no transformers needed)."""
    from safetensors.torch import load_file

    from .word_text import TinyTextEncoder, WordTokenizer

    refusal = _pickle_refusal(folder / "text_encoder")
    if refusal is not None:
        raise refusal
    try:
        cfg = json.loads((folder / "text_encoder" / "config.json").read_text())
        tokenizer = WordTokenizer.from_config(json.loads((folder / "tokenizer" / "vocab.json").read_text()))
        encoder = TinyTextEncoder(tokenizer.vocab_size, width=int(cfg["width"]), layers=int(cfg["layers"]),
                                  heads=int(cfg["heads"]), context_length=int(cfg["context_length"]))
        encoder.load_state_dict(load_file(str(folder / "text_encoder" / "model.safetensors")), strict=True)
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise EmergentSegError(f"cannot load the word-level text encoder of {folder}: "
                               f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    encoder = encoder.to(device, dtype).eval().requires_grad_(False)

    def encode(prompt: str) -> Conditioning:
        ids, tokens = tokenizer.tokenize(prompt)
        with torch.no_grad():
            context = encoder(ids.unsqueeze(0).to(device))
        return Conditioning(context, {}, tuple(tokens), prompt)
    return encode


def _text_encoder_class(folder: Path) -> str:
    path = folder / "text_encoder" / "config.json"
    if not path.exists():
        return ""
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        raise EmergentSegError(f"{path} is not valid JSON") from None
    return str(cfg.get("_class_name") or (cfg.get("architectures") or [""])[0])


def read_model_defaults(folder: Path) -> dict:
    """The measured defaults stored beside a model (``emergent_seg.json["calibration"]``), or ``{}``."""
    path = folder / DEFAULTS_FILE
    if not path.exists():
        return {}
    try:
        return dict(json.loads(path.read_text()).get("calibration") or {})
    except (OSError, ValueError, AttributeError):
        raise EmergentSegError(f"{path} is not valid JSON; delete it or restore it") from None


def load_diffusers_folder(folder: Path, device: torch.device, dtype: torch.dtype) -> DiffusersBackend:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = _from_pretrained(UNet2DConditionModel, folder / "unet", low_cpu_mem_usage=False,
                            torch_dtype=dtype).to(device)
    unet = unet.eval().requires_grad_(False)
    vae = None
    if (folder / "vae").exists():
        vae = _from_pretrained(AutoencoderKL, folder / "vae", low_cpu_mem_usage=False,
                               torch_dtype=torch.float32).to(device).eval()
    alphas, prediction = _schedule(folder)
    encode = None
    if (folder / "text_encoder").exists():
        if _text_encoder_class(folder) == "WordTextEncoder":
            encode = _word_prompt_encoder(folder, device, dtype)
        else:
            encode = _clip_prompt_encoder(folder, device, dtype)
    backend = DiffusersBackend(unet, vae, encode, alphas, prediction)
    backend.calibration = read_model_defaults(folder)
    return backend


def load_single_file_sd15(path: Path, device: torch.device, dtype: torch.dtype) -> DiffusersBackend:
    """An original-format SD1.x ``.safetensors`` (UNet + VAE + CLIP-L), using the shipped configs.
    Without a tokenizer only the empty prompt (DiffSeg's default) is available: its token ids are
    fixed (BOS then EOS padding), so no vocabulary is needed."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cfg = str(CONFIGS / "sd15")
    # The file is read by safetensors here and handed over as a state dict, so diffusers never
    # opens it (no pickle fallback exists on this path).
    weights = read_safetensors(path)
    try:
        unet = UNet2DConditionModel.from_single_file(weights, config=cfg, subfolder="unet",
                                                     local_files_only=True).to(device, dtype).eval()
        vae = AutoencoderKL.from_single_file(weights, config=cfg, subfolder="vae",
                                             local_files_only=True).to(device, torch.float32).eval()
    except (KeyError, ValueError, RuntimeError, OSError) as exc:
        raise EmergentSegError(f"{path.name} is not an SD1.x checkpoint this loader understands "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                               "for SD2.x/SDXL use a diffusers folder") from None
    tf = _need_transformers()
    prefix = "cond_stage_model.transformer."
    state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
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
    """``None`` = the embedded miniature SD; a folder = diffusers layout; a file = SD1.x safetensors."""
    device = torch.device(device)
    if model is None:
        if not (EMBEDDED_MODEL / "unet").exists():
            raise EmergentSegError(f"no --model given and the embedded default model is missing ({EMBEDDED_MODEL}); "
                                   "pass --model PATH to a diffusers folder or .safetensors")
        return load_diffusers_folder(EMBEDDED_MODEL, device, dtype)
    path = check_model_path(model)
    if path.is_dir():
        return load_diffusers_folder(path, device, dtype)
    return load_single_file_sd15(path, device, dtype)


def check_model_path(model: str | Path) -> Path:
    """The model path, or one line saying why it cannot be a model (checked before any loading)."""
    path = Path(model).expanduser()
    if not path.exists():
        raise EmergentSegError(f"model {path} does not exist; pass a diffusers folder or a .safetensors file")
    if path.is_dir():
        if not (path / "unet").exists():
            raise EmergentSegError(f"{path} is not a diffusers model folder (no unet/ inside)")
        return path
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise EmergentSegError(f"{path.name} is a pickle checkpoint, which is never loaded for safety; "
                               "convert it to .safetensors")
    if path.suffix.lower() != ".safetensors":
        raise EmergentSegError(f"{path.name}: expected a .safetensors file or a diffusers folder")
    return path
