"""``core.backend.Backend`` over a ComfyUI ModelPatcher: with ``dit_concepts.py``, the only modules touching comfy internals.

How a pass works:
- Every :meth:`ComfyBackend.predict_noise` clones the user's ModelPatcher and installs attention
  replace patches (``set_model_attn1_replace``/``attn2_replace``) on exactly the transformer blocks
  the pass's hooks name, plus one ``attn1/attn2_output_patch`` gated on ``block``/``block_index``
  for output hooks. The patches live in the clone's copied ``model_options``; the user's patcher
  is never modified, so nothing has to be removed afterwards, even after an error or a Cancel.
- The forward goes through ``BaseModel.apply_model`` with ``x = x_t * sqrt(sigma^2 + 1)``, so the
  UNet sees exactly ``x_t`` (DiffSeg: the clean latent) at the integer timestep; epsilon is
  recovered as ``(x - denoised) / sigma``, which holds for EPS and v-prediction models alike.
- Sites are read from the model's own modules (input/middle/output blocks, SpatialTransformer
  depth and heads, Downsample/Upsample for strides), so SD1.x, SD2.x and SDXL work at any size.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Callable, Sequence

import comfy.model_management as mm
import comfy.utils
import torch
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

from ..core.backend import Conditioning, PassHooks, Progress
from ..core.errors import EmergentSegError, UnsupportedModelError
from ..core.sites import AttentionSite

try:  # video UNets (SVD) reuse SpatialTransformer with temporal blocks we cannot address
    from comfy.ldm.modules.attention import SpatialVideoTransformer
    _VIDEO: tuple[type, ...] = (SpatialVideoTransformer,)
except ImportError:  # pragma: no cover - older trees
    _VIDEO = ()

log = logging.getLogger("emergent_seg")

NEEDS_UNET = "emergent-seg needs an SD1.x/SD2.x/SDXL UNet model"
_STAGES = {"input": "down", "middle": "mid", "output": "up"}
# Scalar entries of a CONDITIONING dict that SDXL's size embedding reads (CLIPTextEncodeSDXL).
# Flux's ``guidance`` (FluxGuidance) is a scalar entry too.
_SCALAR_OPTIONS = ("width", "height", "crop_w", "crop_h", "target_width", "target_height",
                   "aesthetic_score", "guidance")
_OPT = "opt:"
# Flux Kontext's ``reference_latents`` (a list of LATENT samples) travel as ``ref:<i>`` entries.
_REF = "ref:"


def site_key(block: str, number: int, depth: int, kind: str) -> str:
    """``"output.9.0.attn1"``: ComfyUI's ``(block, number, depth)`` plus which attention."""
    return f"{block}.{number}.{depth}.{'attn1' if kind == 'self' else 'attn2'}"


def model_sites(diffusion_model: torch.nn.Module, model_name: str = "") -> tuple[list[AttentionSite], int]:
    """Attention sites of a ComfyUI ``UNetModel`` in execution order, and its number of 2x
    downsamplings. Raises :class:`UnsupportedModelError` for anything that is not a UNet with
    SpatialTransformers (Flux, SD3, other DiTs, video UNets)."""
    name = model_name or type(diffusion_model).__name__
    if not all(hasattr(diffusion_model, a) for a in ("input_blocks", "middle_block", "output_blocks")):
        raise UnsupportedModelError(
            f"the connected model is {name}, a transformer that is neither a UNet nor Flux/SD3; {NEEDS_UNET}, "
            "or a Flux or SD3/SD3.5 model")
    sites: list[AttentionSite] = []
    stride, downs = 1, 0
    counters = {"down": 0, "mid": 0, "up": 0}

    def visit(block_name: str, number: int, module: torch.nn.Module) -> None:
        nonlocal stride, downs
        for layer in module.children() if isinstance(module, torch.nn.Sequential) else [module]:
            if isinstance(layer, _VIDEO):
                raise UnsupportedModelError(
                    f"the connected model is {name}, a video UNet; {NEEDS_UNET}")
            if isinstance(layer, SpatialTransformer):
                stage = _STAGES[block_name]
                for depth, tb in enumerate(layer.transformer_blocks):
                    for attn_name, kind in (("attn1", "self"), ("attn2", "cross")):
                        attn = getattr(tb, attn_name, None)
                        if attn is None or (kind == "self" and getattr(tb, "disable_self_attn", False)):
                            continue
                        sites.append(AttentionSite(
                            site_key(block_name, number, depth, kind), kind, stride, int(attn.heads),
                            len(sites), stage, counters[stage], depth, (block_name, number, depth)))
                counters[stage] += 1
            elif isinstance(layer, Downsample):
                stride *= 2
                downs += 1
            elif isinstance(layer, Upsample):
                stride //= 2

    for i, module in enumerate(diffusion_model.input_blocks):
        visit("input", i, module)
    if diffusion_model.middle_block is not None:
        visit("middle", 0, diffusion_model.middle_block)
    for i, module in enumerate(diffusion_model.output_blocks):
        visit("output", i, module)
    if not sites:
        raise UnsupportedModelError(f"the connected model ({name}) is a UNet without transformer "
                                    f"blocks, so it has no attention to read; {NEEDS_UNET}")
    return sites, downs


def comfy_progress(total: int = 0) -> Progress:
    """A core :class:`Progress` that drives ComfyUI's progress bar and honours Cancel.

    Cancellation raises ComfyUI's own ``InterruptProcessingException`` (via
    ``throw_exception_if_processing_interrupted``), so the executor reports an interruption
    rather than an error.
    """
    bar = comfy.utils.ProgressBar(max(total, 1))

    def update(done: int, all_: int) -> None:
        bar.update_absolute(done, max(all_, 1))

    def cancelled() -> bool:
        mm.throw_exception_if_processing_interrupted()
        return False

    return Progress(total=total, on_update=update, is_cancelled=cancelled)


def _tensor_entries(options: dict, batch: int) -> dict[str, torch.Tensor]:
    """Batch-first tensors (and SDXL's scalar size options as ``[1, 1]`` tensors) of a
    CONDITIONING dict, in the form :class:`Conditioning.extra` carries them."""
    out: dict[str, torch.Tensor] = {}
    for k, v in options.items():
        if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] in (1, batch):
            out[k] = v
        elif k in _SCALAR_OPTIONS and isinstance(v, (int, float)) and not isinstance(v, bool):
            out[_OPT + k] = torch.tensor([[float(v)]])
        elif k == "reference_latents" and isinstance(v, (list, tuple)):
            out.update({f"{_REF}{i}": t for i, t in enumerate(v) if isinstance(t, torch.Tensor)})
    return out


class _HostModel:
    """What every pass over a ComfyUI MODEL needs: the VAE, the text encoder, conditioning in the
    form ``apply_model`` takes. Never modifies ``model``."""

    def __init__(self, model: Any, vae: Any = None, clip: Any = None,
                 progress: Progress | None = None) -> None:
        self.model, self.vae, self.clip = model, vae, clip
        self.progress = progress
        ratio = getattr(vae, "downscale_ratio", 8)  # a callable for some video VAEs
        self.latent_scale = ratio if isinstance(ratio, int) else 8
        #: a user's checkpoint carries no stored defaults: the papers' values apply
        self.calibration: dict = {}
        self._empty: Conditioning | None = None

    def _check_cancel(self) -> None:
        mm.throw_exception_if_processing_interrupted()
        if self.progress is not None:
            self.progress.check()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W]`` in [0,1] -> scaled latent (ComfyUI's VAE returns the posterior mean)."""
        if self.vae is None:
            raise EmergentSegError("an IMAGE needs a VAE to be encoded; connect the checkpoint's VAE "
                                   "or give a LATENT instead")
        raw = self.vae.encode(images.movedim(1, -1)[..., :3])
        return self.model.model.process_latent_in(raw)

    def latent_in(self, samples: torch.Tensor) -> torch.Tensor:
        """A LATENT's raw ``samples`` -> scaled latent (``process_latent_in``)."""
        return self.model.model.process_latent_in(samples)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            raise EmergentSegError("decoding needs a VAE; connect the checkpoint's VAE")
        images = self.vae.decode(self.model.model.process_latent_out(latents))
        images = images.reshape(-1, *images.shape[-3:])
        return images[..., :3].movedim(-1, 1).clamp(0, 1)

    def empty_conditioning(self) -> Conditioning:
        if self._empty is None:
            if self.clip is None:
                raise EmergentSegError(
                    "Capture Attention needs the empty prompt's conditioning: connect the "
                    "checkpoint's CLIP (or a CONDITIONING from CLIP Text Encode)")
            self._empty = self.encode_prompt("")
        return self._empty

    def encode_prompt(self, prompt: str) -> Conditioning:
        """Encode ``prompt`` like CLIP Text Encode does, keeping each position's token string."""
        if self.clip is None:
            raise EmergentSegError("a prompt needs the checkpoint's CLIP; connect it to Capture Attention")
        tokens = self.clip.tokenize(prompt)
        encoded = self.clip.encode_from_tokens_scheduled(tokens)
        cond = self.from_conditioning(encoded)
        return Conditioning(cond.context, cond.extra, token_strings(self.clip, tokens), prompt)

    def from_conditioning(self, conditioning: list, prompt: str | None = None) -> Conditioning:
        """A ComfyUI CONDITIONING (``[[cond, {pooled_output, ...}], ...]``) as a core Conditioning.

        Only the first entry is used: a DiffSeg pass has one context (area and timestep-range
        entries from Conditioning Combine/Set Area would need several passes).
        """
        if not isinstance(conditioning, (list, tuple)) or not conditioning \
                or not isinstance(conditioning[0][0], torch.Tensor):
            raise EmergentSegError("the CONDITIONING input is empty; connect a CLIP Text Encode")
        if len(conditioning) > 1:
            log.warning("emergent_seg: the CONDITIONING has %d entries; only the first is used",
                        len(conditioning))
        context, options = conditioning[0][0], dict(conditioning[0][1])
        return Conditioning(context, _tensor_entries(options, context.shape[0]), None, prompt)

    def _model_kwargs(self, patched: Any, cond: Conditioning, x: torch.Tensor,
                      device: torch.device) -> dict[str, Any]:
        """``apply_model`` keyword arguments from ``BaseModel.extra_conds`` (SDXL's ``y``, Flux's
        ``guidance`` and reference latents too), the way the samplers build them
        (``samplers.encode_model_conds``)."""
        params: dict[str, Any] = {}
        references: list[tuple[int, torch.Tensor]] = []
        for k, v in cond.extra.items():
            if k.startswith(_OPT):
                params[k[len(_OPT):]] = v.reshape(-1)[0].item()
            elif k.startswith(_REF):
                references.append((int(k[len(_REF):]), v))
            else:
                params[k] = v
        if references:
            params["reference_latents"] = [v for _, v in sorted(references, key=lambda item: item[0])]
        params.setdefault("width", x.shape[-1] * self.latent_scale)
        params.setdefault("height", x.shape[-2] * self.latent_scale)
        params.update(cross_attn=cond.context, device=device, noise=x, prompt_type="positive")
        conds = patched.model.extra_conds(**params)
        out = {}
        for k, c in conds.items():
            out[k] = c.process_cond(batch_size=x.shape[0], device=device, area=None).cond
        return out


class ComfyBackend(_HostModel):
    """:class:`core.backend.Backend` over a ComfyUI ``ModelPatcher`` (MODEL) holding a UNet.

    Args:
        model: the MODEL socket value. It is cloned for every pass and never modified.
        vae: the VAE socket value, for :meth:`encode`/:meth:`decode` (optional when a LATENT is
            given).
        clip: the CLIP socket value, for :meth:`encode_prompt` and the empty prompt.
        progress: polled for cancellation inside every hooked layer.
    """

    def __init__(self, model: Any, vae: Any = None, clip: Any = None,
                 progress: Progress | None = None) -> None:
        base = getattr(model, "model", None)
        diffusion_model = getattr(base, "diffusion_model", None)
        if diffusion_model is None:
            raise UnsupportedModelError(f"the MODEL input ({type(model).__name__}) has no diffusion "
                                        f"model; {NEEDS_UNET}")
        super().__init__(model, vae, clip, progress)
        self._sites, self._downs = model_sites(diffusion_model, type(base).__name__)
        self._by_key = {s.key: s for s in self._sites}

    # --- Backend protocol -------------------------------------------------------------------
    def sites(self) -> list[AttentionSite]:
        return list(self._sites)

    def size_multiple(self) -> int:
        return self.latent_scale * 2 ** self._downs

    def _model_sampling(self) -> Any:
        return self.model.get_model_object("model_sampling")

    def alphas_cumprod(self) -> torch.Tensor:
        sigmas = self._model_sampling().sigmas.detach().to("cpu", torch.float64)
        return 1.0 / (1.0 + sigmas ** 2)

    def predict_noise(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                      hooks: PassHooks | None = None) -> torch.Tensor:
        hooks = hooks or PassHooks()
        unknown = (hooks.attention.keys() | hooks.output.keys()) - self._by_key.keys()
        if unknown:
            raise EmergentSegError(f"unknown attention sites: {sorted(unknown)[:3]}")
        b = latents.shape[0]
        cond = cond.expand(b)
        patched = self._patched_clone(hooks)
        try:
            memory = patched.model.memory_required([b * 2] + list(latents.shape[1:]))
        except Exception:  # noqa: BLE001 - only an estimate
            memory = 0
        mm.load_models_gpu([patched], memory_required=memory)
        device = patched.load_device
        ms = patched.get_model_object("model_sampling")
        x_t = latents.to(device, torch.float32)
        sigma = ms.sigma(timesteps.to(device).float()).to(torch.float32)
        x = x_t * (sigma ** 2 + 1).sqrt().view(-1, *([1] * (x_t.ndim - 1)))
        kwargs = self._model_kwargs(patched, cond, x, device)
        to = dict(patched.model_options["transformer_options"])
        with torch.no_grad():
            denoised = patched.model.apply_model(x, sigma, transformer_options=to, **kwargs)
        eps = (x - denoised.float()) / sigma.view(-1, *([1] * (x.ndim - 1)))
        return eps.to(latents.device)

    # --- internals --------------------------------------------------------------------------
    def _patched_clone(self, hooks: PassHooks) -> Any:
        """A clone of the user's patcher carrying this pass's hooks (and nothing else of ours)."""
        m = self.model.clone()
        existing = m.model_options.get("transformer_options", {}).get("patches_replace", {})
        for key, fn in hooks.attention.items():
            site = self._by_key[key]
            name, number, depth = site.host_block
            slot = "attn1" if site.kind == "self" else "attn2"
            if (name, number, depth) in existing.get(slot, {}) or (name, number) in existing.get(slot, {}):
                log.warning("emergent_seg: %s at %s already had an attention patch from another node; "
                            "it is bypassed for this pass", slot, key)
            patch = self._attention_patch(site, fn)
            if site.kind == "self":
                m.set_model_attn1_replace(patch, name, number, depth)
            else:
                m.set_model_attn2_replace(patch, name, number, depth)
        for kind, setter in (("self", m.set_model_attn1_output_patch),
                             ("cross", m.set_model_attn2_output_patch)):
            table = {self._by_key[k].host_block: (self._by_key[k], fn)
                     for k, fn in hooks.output.items() if self._by_key[k].kind == kind}
            if table:
                setter(self._output_patch(table))
        return m

    def _attention_patch(self, site: AttentionSite, fn: Callable) -> Callable:
        def patch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
            self._check_cancel()
            return fn(site, q, k, v)
        return patch

    def _output_patch(self, table: dict) -> Callable:
        def patch(n: torch.Tensor, extra_options: dict) -> torch.Tensor:
            block = extra_options.get("block")
            if block is None:
                return n
            entry = table.get((block[0], block[1], extra_options.get("block_index", 0)))
            if entry is None:
                return n
            self._check_cancel()
            return entry[1](entry[0], n)
        return patch


def token_strings(clip: Any, tokens: dict) -> tuple[str | None, ...] | None:
    """The token string at every position of a ComfyUI tokenization (``clip.tokenize``), chunks
    concatenated as in the encoded context; ``None`` where unknown (embeddings), or ``None``
    overall when the tokenizer cannot name its ids."""
    tokenizer = getattr(clip, "tokenizer", None)
    for key, chunks in tokens.items():
        inner = getattr(getattr(tokenizer, f"clip_{key}", None), "tokenizer", None)
        convert = getattr(inner, "convert_ids_to_tokens", None)
        if convert is None:
            continue
        out: list[str | None] = []
        for chunk in chunks:
            for item in chunk:
                tid = item[0]
                if isinstance(tid, torch.Tensor) and tid.ndim == 0:
                    tid = int(tid)
                out.append(convert(int(tid)) if isinstance(tid, int) else None)
        return tuple(out)
    return None



# ---------------------------------------------------------------------------------------------
# DiT hosts: Flux (incl. Chroma-style blocks) and SD3/SD3.5 joint attention
# ---------------------------------------------------------------------------------------------

#: ComfyUI releases before this one have no ``optimized_attention_override``.
MIN_COMFY_FOR_DIT = "0.3.60"


def dit_family(model: Any) -> str | None:
    """``"flux"`` or ``"sd3"`` for a MODEL whose diffusion model is one of those DiT classes
    (Chroma and Kontext reuse Flux's blocks), else ``None``."""
    net = getattr(getattr(model, "model", None), "diffusion_model", None)
    if net is None:
        return None
    from comfy.ldm.flux.model import Flux
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    if isinstance(net, Flux):
        return "flux"
    if isinstance(net, MMDiT):
        return "sd3"
    try:
        from comfy.ldm.chroma.model import Chroma
    except ImportError:  # pragma: no cover - older trees
        return None
    return "flux" if isinstance(net, Chroma) else None


def require_attention_override() -> None:
    """A clear error on ComfyUI releases that cannot hand attention calls to a pack."""
    import comfy.ldm.modules.attention as host_attention

    if not hasattr(host_attention, "wrap_attn"):
        try:
            from comfyui_version import __version__ as found
        except ImportError:
            found = "an older release"
        raise UnsupportedModelError(f"reading a Flux/SD3 model's attention needs ComfyUI {MIN_COMFY_FOR_DIT} "
                                    f"or newer (this is {found}); update ComfyUI")


def dit_blocks(model: Any) -> list[str]:
    """Names of a DiT model's blocks in execution order: Flux ``double_block.i`` then
    ``single_block.i``; SD3/SD3.5 (MMDiT) ``double_block.i``. Any other model is an
    :class:`UnsupportedModelError`."""
    family = dit_family(model)
    net = model.model.diffusion_model
    if family == "flux":
        return ([f"double_block.{i}" for i in range(len(net.double_blocks))]
                + [f"single_block.{i}" for i in range(len(net.single_blocks))])
    if family == "sd3":
        return [f"double_block.{i}" for i in range(len(net.joint_blocks))]
    raise UnsupportedModelError(f"{type(net).__name__} is not a Flux or SD3 (MMDiT) model")


class ComfyDitBackend(_HostModel):
    """A Flux or SD3/SD3.5 MODEL for DiffSeg's capture: the same VAE and text handling as
    :class:`ComfyBackend`, with joint-attention blocks in place of a UNet's attention sites.

    ``sites()`` lists every block as a self-attention site on the one patch grid (stride = the
    patch size), which is what the size and memory checks read."""

    def __init__(self, model: Any, vae: Any = None, clip: Any = None,
                 progress: Progress | None = None) -> None:
        family = dit_family(model)
        if family is None:
            raise UnsupportedModelError(f"the MODEL input ({type(model).__name__}) is not a Flux or SD3 model")
        require_attention_override()
        super().__init__(model, vae, clip, progress)
        self.family = family
        net = model.model.diffusion_model
        self.patch = int(net.patch_size)
        self.blocks = dit_blocks(model)
        first = net.joint_blocks[0].x_block.attn if family == "sd3" else net.double_blocks[0]
        heads = int(getattr(net, "num_heads", 0) or getattr(first, "num_heads", 1))
        self._sites = [AttentionSite(name, "self", self.patch, heads, i, "mid", i, 0, None)
                       for i, name in enumerate(self.blocks)]
        self._sigmas: torch.Tensor | None = None

    def sites(self) -> list[AttentionSite]:
        return list(self._sites)

    def size_multiple(self) -> int:
        return self.latent_scale * self.patch

    def default_blocks(self) -> list[str]:
        from ..core.settings import dit_preset

        doubles = sum(1 for b in self.blocks if b.startswith("double"))
        return dit_preset(self.family).blocks(doubles, len(self.blocks) - doubles)

    def capture(self, latents: torch.Tensor, cond: Conditioning, sigma: float, blocks: list[str],
                image_size: tuple[int, int], seed: int = 0,
                also: Callable[[dict[str, Any]], Sequence[Callable[[Any], None]]] | None = None) -> Any:
        """DiffSeg's aggregate over ``blocks`` (:func:`capture_dit_attention`) for scaled latents.
        ``also(model_kwargs)`` may return more hook installers for the same pass (the concept
        stream of ``nodes/dit_concepts.py`` ``capture_with_words``)."""
        device = mm.get_torch_device()
        x = latents.to(device, torch.float32)
        kwargs = self._model_kwargs(self.model, cond, x, device)
        return capture_dit_attention(self.model, latents, kwargs, sigma, blocks, image_size, seed=seed,
                                     progress=self.progress, also=tuple(also(kwargs)) if also else ())

    # --- EmerDiff on DiT (experimental) -----------------------------------------------------
    # The core's EmerDiff code speaks SD's language: integer timesteps 0..999, a VP schedule
    # (alphas_cumprod) and an epsilon prediction. A rectified-flow model maps onto it exactly:
    # at noise level s, x_flow = (1-s)*x0 + s*eps, and x_vp = x_flow / sqrt((1-s)^2 + s^2) has
    # alpha_cumprod = (1-s)^2 / ((1-s)^2 + s^2). Timestep t stands for the model's own noise level
    # at that fraction of its schedule (shift included).

    def _sigma_of_timesteps(self) -> torch.Tensor:
        if self._sigmas is None:         # 1000 host calls: once per backend, not once per pass
            ms = self.model.get_model_object("model_sampling")
            self._sigmas = torch.tensor([float(ms.percent_to_sigma(1.0 - (t + 1) / 1000.0)) for t in range(1000)],
                                        dtype=torch.float64).clamp(1e-6, 1.0)
        return self._sigmas

    def alphas_cumprod(self) -> torch.Tensor:
        s = self._sigma_of_timesteps()
        return (1 - s) ** 2 / ((1 - s) ** 2 + s ** 2)

    def emerdiff_block(self) -> str:
        """The block EmerDiff reads features from and modulates: the middle joint (double) block."""
        doubles = [b for b in self.blocks if b.startswith("double")]
        return doubles[len(doubles) // 2]

    def emerdiff_site(self, latent_hw: tuple[int, int], grid: Any = 0, layer: int = 0, depth: int = 0) -> AttentionSite:
        """The mapper's site on a DiT (``core.lowres.choose_site`` asks the backend): the
        :meth:`emerdiff_block` on the full token grid, whatever grid or layer was asked for."""
        name = self.emerdiff_block()
        return next(s for s in self._sites if s.key == name)

    def predict_noise(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                      hooks: PassHooks | None = None) -> torch.Tensor:
        """Epsilon in the VP form above. Attention hooks of a block receive its attention calls as
        ``q, k, v [B, N, heads*d]`` over the whole sequence (text, image, reference tokens) and
        return its output; output hooks receive the image rows ``[B, h*w, heads*d]`` of the
        block's joint attention output (before the projection)."""
        return self._predict(self.model, latents, timesteps, cond, hooks)

    def _predict(self, base: Any, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                 hooks: PassHooks | None) -> torch.Tensor:
        """:meth:`predict_noise` on a clone of ``base`` (the user's MODEL, or a clone of it that
        carries a reading patch to chain)."""
        hooks = hooks or PassHooks()
        unknown = (hooks.attention.keys() | hooks.output.keys()) - set(self.blocks)
        if unknown:
            raise EmergentSegError(f"unknown DiT blocks: {sorted(unknown)[:3]}")
        h, w = latents.shape[-2:]
        n_image = (h // self.patch) * (w // self.patch)
        table = self._sigma_of_timesteps()
        sigma = table[timesteps.detach().cpu().long()].to(torch.float32)
        scale = ((1 - sigma) ** 2 + sigma ** 2).sqrt()
        by_key = {site.key: site for site in self._sites}
        clone = base.clone()
        state, previous = _tag_blocks(clone, self.blocks)

        def override(func: Callable, *args: Any, **kwargs: Any) -> Any:
            block, text = state["block"], state["txt"]
            attention_fn = hooks.attention.get(block)
            output_fn = hooks.output.get(block)
            if attention_fn is None and output_fn is None:
                return previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)
            self._check_cancel()
            site = by_key[block]
            if attention_fn is not None:
                q, k, v = (_heads_first(t, kwargs, args) for t in args[:3])
                if q.shape[1] != site.heads:           # SD3.5's image-only attention may differ
                    site = replace(site, heads=int(q.shape[1]))
                out = attention_fn(site, _tokens_last(q), _tokens_last(k), _tokens_last(v))
            else:
                out = previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)
                if kwargs.get("skip_output_reshape"):
                    out = _tokens_last(out)
            if output_fn is not None and text is not None and out.shape[1] >= text + n_image:
                out = out.clone()
                out[:, text:text + n_image] = output_fn(site, out[:, text:text + n_image])
            if kwargs.get("skip_output_reshape"):
                heads = _heads_first(args[0], kwargs, args).shape[1]
                out = out.view(out.shape[0], out.shape[1], heads, -1).transpose(1, 2)
            return out

        clone.model_options["transformer_options"]["optimized_attention_override"] = override
        mm.load_models_gpu([clone])
        device = clone.load_device
        s = sigma.to(device)
        x = latents.to(device, torch.float32) * scale.to(device).view(-1, 1, 1, 1)
        kwargs = self._model_kwargs(clone, cond, x, device)
        to = dict(clone.model_options["transformer_options"])
        with torch.no_grad():
            denoised = clone.model.apply_model(x, s, transformer_options=to, **kwargs).float()
        s4 = s.view(-1, 1, 1, 1)
        eps = (x - (1 - s4) * denoised) / s4
        return eps.to(latents.device)

    def lowres_kmeans(self, latents: torch.Tensor, cond: Conditioning, k: int, timestep: int, seed: int,
                      grid: int, image_size: tuple[int, int]) -> Any:
        """EmerDiff's low-res k-means on a DiT (experimental): the image-stream tokens entering
        :meth:`emerdiff_block` (no rotary position in them), at ``timestep`` of the model's schedule
        with seeded noise, averaged onto a grid at 1/32 of the image side (or ``grid`` cells per
        side), then seeded k-means. ``lowres`` is that grid; ``lowres_layer`` is the block index."""
        from ..core.lowres import add_noise, kmeans_labels, upsample_labels
        from ..core.segmentation import Segmentation

        b, _, h, w = latents.shape
        tokens = (h // self.patch, w // self.patch)
        if grid > 0:
            target = (min(grid, tokens[0]), min(grid, tokens[1]))
        else:
            target = tuple(max(1, round(side * self.latent_scale / 32)) for side in (h, w))
            target = (min(target[0], tokens[0]), min(target[1], tokens[1]))
        if not 1 <= k <= target[0] * target[1]:
            raise EmergentSegError(f"K = {k} segments requested but the {target[0]}x{target[1]} low-res grid "
                                   f"has only {target[0] * target[1]} cells; use 1 <= K <= {target[0] * target[1]}")
        name = self.emerdiff_block()
        kind, index = name.split(".")
        n = tokens[0] * tokens[1]
        captured: list[torch.Tensor] = []
        user = self.model
        chained = user.model_options.get("transformer_options", {}).get("patches_replace", {}) \
            .get("dit", {}).get((kind, int(index)))

        def read(args: dict, extra: dict) -> dict:
            captured.append(args["img"][:, :n].detach().float().clone())   # a double block's image stream
            return chained(args, extra) if chained is not None else extra["original_block"](args)

        x_t = add_noise(self, latents, int(timestep), seed).to(latents.dtype)
        t = torch.full((b,), int(timestep), dtype=torch.long)
        reading = user.clone()
        reading.set_model_patch_replace(read, "dit", kind, int(index))
        self._predict(reading, x_t, t, cond, None)          # chains `read` under its block tag
        if len(captured) != 1:
            raise EmergentSegError(f"the feature block {name} ran {len(captured)} times in one pass")
        feats = captured[0].view(b, tokens[0], tokens[1], -1).permute(0, 3, 1, 2)
        pooled = torch.nn.functional.adaptive_avg_pool2d(feats, target)
        low = kmeans_labels(pooled.flatten(2).transpose(1, 2), target, int(k), int(seed))
        info = {"grid": list(target), "grid_requested": [int(grid), int(grid)], "site": name,
                "layer": int(index), "timestep": int(timestep), "k": int(k), "seed": int(seed),
                "evaluations": int(b), "vae_decodes": 0, "experimental": "EmerDiff on a DiT"}
        return Segmentation.from_labels(upsample_labels(low, image_size), method="emerdiff-kmeans",
                                        lowres=low, lowres_layer=int(index), info=info)


def _heads_first(x: torch.Tensor, kwargs: dict, args: tuple) -> torch.Tensor:
    """q, k or v of an attention call as ``[B, heads, N, d]``: Flux passes them so
    (``skip_reshape``); MMDiT passes q/k as ``[B, N, heads*d]`` and v as ``[B, N, heads, d]``."""
    if kwargs.get("skip_reshape"):
        return x
    if x.ndim == 4:
        return x.transpose(1, 2)
    heads = int(kwargs["heads"] if "heads" in kwargs else args[3])
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def _tokens_last(x: torch.Tensor) -> torch.Tensor:
    """``[B, heads, N, d]`` -> ``[B, N, heads*d]`` (the layout of a UNet's attention calls)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def capture_dit_attention(model: Any, latents: torch.Tensor, model_kwargs: dict[str, Any], sigma: float,
                          blocks: list[str], image_size: tuple[int, int], seed: int = 0,
                          budget_bytes: int | None = None, progress: Progress | None = None,
                          also: Sequence[Callable[[Any], None]] = ()) -> Any:
    """One DiT pass (Flux, SD3/SD3.5) at noise level ``sigma`` (rectified flow:
    ``x = sigma*noise + (1-sigma)*x0``, through the model's own sampling object, shift included)
    folding the image->image attention of ``blocks`` into DiffSeg's aggregate
    (``core/joint_attention.py``).

    Hooks, on a clone of ``model`` only: a ``patches_replace["dit"]`` wrapper per block names the
    running block and its text length, chaining any replace patch already there;
    ``transformer_options["optimized_attention_override"]`` sees q/k of every attention call and
    hands the call on to any override another pack installed, else to the host's own attention,
    so the prediction is unchanged. Image tokens are found by position after the text tokens,
    never as "the last N" (Flux Kontext's reference latents follow the image). Only a block's
    joint attention counts; SD3.5's extra image-only attention in some blocks is passed through.

    Args:
        latents: ``[B, C, h, w]`` model-space latents (``process_latent_in`` applied).
        model_kwargs: what ``apply_model`` takes besides ``x``/``t`` (``c_crossattn``, ``y``,
            ``guidance``, ``ref_latents``, ...).
        blocks: names from :func:`dit_blocks`.
        progress: advanced once per block, polled for Cancel.
        also: more hook installers run on the same clone after ours (e.g. a concept stream's
            ``install``), so one pass serves them all.
    """
    from ..core.attention import DEFAULT_CHUNK_BYTES
    from ..core.joint_attention import JointAttentionCapture

    require_attention_override()
    available = dit_blocks(model)
    unknown = [b for b in blocks if b not in available]
    if unknown:
        raise EmergentSegError(f"blocks {unknown} are not in this model ({len(available)} blocks: "
                               f"{available[0]} .. {available[-1]})")
    if not blocks:
        raise EmergentSegError("choose at least one block to read attention from")
    if not 0.0 < float(sigma) <= 1.0:
        raise EmergentSegError(f"sigma must be in (0, 1] for a rectified-flow model, got {sigma}")
    net = model.model.diffusion_model
    patch = int(net.patch_size)
    b, _, h, w = latents.shape
    if h % patch or w % patch:
        raise EmergentSegError(f"latent {w}x{h} is not a multiple of the model's {patch}x{patch} patches")
    grid = (h // patch, w // patch)
    n_image = grid[0] * grid[1]
    cap = JointAttentionCapture(batch=int(b), grid=grid, blocks=tuple(blocks), image_size=image_size,
                                timestep=round(float(sigma) * 1000),
                                budget_bytes=budget_bytes or DEFAULT_CHUNK_BYTES, device=latents.device)
    if progress is not None:
        progress.grow(len(available))
    clone = model.clone()
    state, previous = _tag_blocks(clone, available, progress)

    def override(func: Callable, *args: Any, **kwargs: Any) -> Any:
        block, text = state["block"], state["txt"]
        if block in cap.blocks and text is not None:
            q = _heads_first(args[0], kwargs, args)
            if q.shape[2] >= text + n_image:               # the joint attention, not an image-only one
                k = _heads_first(args[1], kwargs, args)
                cap.observe(block, q, k, slice(text, text + n_image))
        return previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)

    clone.model_options["transformer_options"]["optimized_attention_override"] = override
    for install in also:
        install(clone)
    run_dit_pass(clone, latents, model_kwargs, sigma, seed)
    return cap.result()


def run_dit_pass(clone: Any, latents: torch.Tensor, model_kwargs: dict[str, Any], sigma: float, seed: int) -> None:
    """One forward of ``clone`` (a hooked clone of the user's model) at noise level ``sigma``:
    ``x = sigma*noise + (1-sigma)*x0`` through the model's sampling object, the noise
    ``torch.randn`` from a CPU generator seeded with ``seed`` (the same on every device)."""
    if not 0.0 < float(sigma) <= 1.0:
        raise EmergentSegError(f"sigma must be in (0, 1] for a rectified-flow model, got {sigma}")
    mm.load_models_gpu([clone])
    device = clone.load_device
    ms = clone.get_model_object("model_sampling")
    x0 = latents.to(device, torch.float32)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(int(seed))).to(device)
    s = torch.full((int(latents.shape[0]),), float(sigma), device=device)
    x = ms.noise_scaling(s.view(-1, 1, 1, 1), noise, x0)
    to = dict(clone.model_options["transformer_options"])
    kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in model_kwargs.items()}
    with torch.no_grad():
        clone.model.apply_model(x, s, transformer_options=to, **kwargs)


def _tag_blocks(clone: Any, blocks: Sequence[str], progress: Progress | None = None
                ) -> tuple[dict[str, Any], Callable | None]:
    """Install a :func:`_block_tag` replace patch on every block of ``clone``, chaining the patch
    already there. Returns the shared ``{"block", "txt"}`` state the tags keep current and the
    attention override ``clone`` had before (to chain from ours)."""
    state: dict[str, Any] = {"block": None, "txt": None}
    options = clone.model_options.setdefault("transformer_options", {})
    existing = options.get("patches_replace", {}).get("dit", {})
    for name in blocks:
        kind, index = name.split(".")
        clone.set_model_patch_replace(_block_tag(name, state, existing.get((kind, int(index))), progress),
                                      "dit", kind, int(index))
    return state, options.get("optimized_attention_override")


def _block_tag(name: str, state: dict[str, Any], chained: Callable | None,
               progress: Progress | None = None) -> Callable:
    def patch(args: dict, extra: dict) -> dict:
        mm.throw_exception_if_processing_interrupted()
        state["block"] = name
        if "txt" in args:                     # double blocks: text and image streams apart
            state["txt"] = int(args["txt"].shape[1])
        try:
            return chained(args, extra) if chained is not None else extra["original_block"](args)
        finally:
            state["block"] = None
            if progress is not None:
                progress.advance()
    return patch
