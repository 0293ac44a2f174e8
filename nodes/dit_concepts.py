"""Per-word maps for Flux in the ConceptAttention manner (Helbling et al., ICML 2025), through the host.

What ConceptAttention does (github helblazer811/ConceptAttention, ``concept_attention/flux/dit_block.py``
``ModifiedDoubleStreamBlock``, ``flux/dit.py``, ``flux/pipeline.py`` ``compute_heatmaps_from_vectors``,
``utils.py`` ``embed_concepts``), and how it is reproduced here:

- Every concept word is one extra token, embedded alone by the text encoder (ConceptAttention: T5 on
  the word, first token kept). It goes through ``txt_in`` and then, in every double block, through the
  block's *text-stream* weights: ``txt_mod`` modulation, ``txt_norm1``, ``txt_attn.qkv``, q/k RMS norm,
  attention, ``txt_attn.proj`` with the gate, ``txt_norm2``/``txt_mlp`` with the gate. The concepts'
  modulation vector is ConceptAttention's ``concept_vec``: the model's ``vec`` with the pooled-text
  term computed from a zero pooled vector (``embed_concepts`` returns ``zeros_like`` of the CLIP
  pooled output); ``pooled="prompt"`` uses the model's own ``vec`` instead.
- The concept queries attend to the concept keys and the image keys (not the prompt's text keys);
  concept ids are 0, so their rotary embedding is that of position 0 (the identity for Flux). The
  image never attends to the concepts: they are not in the model's sequence at all, so the model's
  prediction is unchanged, bit for bit.
- A block's map compares, by dot product, each image token's attention output with each concept's
  attention output, both *before* ``proj`` (ConceptAttention's "output space":
  ``output_space_image_vectors``/``output_space_concept_vectors``, ``B L (H D)``), with no scaling;
  a softmax over the concepts per image token, then the mean over the chosen blocks (and over the
  passes, if more than one ran). ConceptAttention's ``encode_image`` defaults: double blocks 15-18
  of Flux's 19 (:data:`DEFAULT_LAST_BLOCKS` = the last 4), one pass at t = 0.5
  (:data:`CONCEPT_ATTENTION_SIGMA`: flux-schnell's 4-step schedule, step 2). Single blocks are not
  used (the concepts run through the double blocks only, as there).

Host mechanics: only ComfyUI's official DiT hooks, on a clone of the user's ModelPatcher. A
``patches_replace["dit"][("double_block", i)]`` patch (chaining any patch already there) prepares the
concepts' q/k/v from the block's ``vec`` before the block runs and advances the concept stream after
it. ``transformer_options["optimized_attention_override"]`` (chaining any override already there)
sees the block's joint attention call: q/k/v after RoPE and the attention output the block uses, so
the image rows of that output and the image keys/values are the model's own, at no extra attention
cost. Image tokens are found by position after the text tokens (Flux Kontext's reference latents
follow the image; concepts do not attend to them). A Flux ``attention_mask`` (regional prompting)
shapes the model's own attention, hence the image outputs; the concepts' attention, computed in
float32 beside it, has no mask (ConceptAttention has none either).

SD3/SD3.5 (MMDiT) is the same with its joint blocks' ``context_block`` as the text stream
(:class:`MMDiTConceptStream`, :func:`mmdit_concept_maps`); see that class for how it departs from
ConceptAttention's own SD3 code.

Like ``comfy_backend.py`` (whose pass runner and q/k/v layout helpers it shares), this module
imports ComfyUI and is only loaded inside the host.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..core.errors import EmergentSegError, UnsupportedModelError
from .comfy_backend import _heads_first, _tokens_last, run_dit_pass

#: ConceptAttention's default layers are Flux double blocks 15-18 of 19: the last four.
DEFAULT_LAST_BLOCKS = 4
#: ConceptAttention's ``encode_image`` noise level: flux-schnell's 4-step schedule, step 2 (t = 0.5).
CONCEPT_ATTENTION_SIGMA = 0.5
POOLED_MODES = ("zero", "prompt")


def concept_scores(image_out: torch.Tensor, concept_out: torch.Tensor) -> torch.Tensor:
    """ConceptAttention's map of one block: ``softmax over concepts of (image_out · concept_out)``.

    Args:
        image_out: ``[B, n_image, H*D]`` attention outputs of the image tokens (before ``proj``).
        concept_out: ``[B, n_concepts, H*D]`` attention outputs of the concept tokens.

    Returns:
        ``[B, n_image, n_concepts]`` float32; every row sums to 1.
    """
    scores = torch.einsum("bnd,bcd->bnc", image_out.float(), concept_out.float())
    return torch.softmax(scores, dim=-1)


def default_concept_blocks(depth: int) -> list[str]:
    """ConceptAttention's default Flux blocks for a model with ``depth`` double blocks: the last four."""
    return [f"double_block.{i}" for i in range(max(0, depth - DEFAULT_LAST_BLOCKS), depth)]


def _block_indices(blocks: Sequence[int | str], depth: int) -> tuple[int, ...]:
    """``"double_block.7"`` or ``7`` -> 7, checked against the model's double (joint) blocks."""
    out = []
    for b in blocks:
        name = b if isinstance(b, str) else f"double_block.{int(b)}"
        kind, _, number = name.partition(".")
        if kind != "double_block" or not number.isdigit() or int(number) >= depth:
            raise EmergentSegError(f"block {b!r} is not one of this model's double blocks "
                                   f"(double_block.0 .. double_block.{depth - 1}); concept maps use double blocks")
        out.append(int(number))
    if not out:
        raise EmergentSegError("choose at least one double block for the concept maps")
    if len(set(out)) != len(out):
        raise EmergentSegError(f"a block is listed twice in {list(blocks)}")
    return tuple(sorted(out))


def _rope(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """Flux's rotary embedding as ``comfy/ldm/flux/math.py`` ``attention`` applies it."""
    shape = x.shape
    x_ = x.to(pe.dtype).reshape(*shape[:-1], -1, 1, 2)
    return (pe[..., 0] * x_[..., 0] + pe[..., 1] * x_[..., 1]).reshape(*shape).type_as(x)


def _output_tokens_last(out: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """An attention output as ``[B, N, heads*d]`` (``skip_output_reshape`` leaves it heads-first)."""
    return _tokens_last(out) if kwargs.get("skip_output_reshape") else out


class ConceptStream:
    """The concept tokens of one DiT pass, run beside the model's text stream, and their maps.

    Subclasses (:class:`FluxConceptStream`, :class:`MMDiTConceptStream`) say how a concept enters
    (the model's text embedder), how a block makes its q/k/v and how it updates it afterwards,
    always with the block's own text-stream modules.

    Use: build one per pass, ``stream.install(clone)`` on a clone of the user's ModelPatcher (before
    or after other hooks of ours: it chains whatever replace patch and attention override the clone
    already has), run the clone's ``apply_model`` once, and read :meth:`result`. To fold the stream
    into another pass that installs its own hooks, the pieces are :meth:`block_patch` (a
    ``("double_block", i)`` replace patch chaining ``chained``) and :meth:`attention_override`
    (chaining ``previous``); ``install`` just applies both, to blocks ``0 .. last chosen``.

    Attributes:
        chosen: indices of the blocks whose maps are averaged.
        states: the concepts' hidden states after each block that ran (``[B, C, hidden]``), of the
            latest pass; for inspection and tests.
        seen: how many times each chosen block contributed a map.
    """

    def __init__(self, net: Any, concepts: torch.Tensor, blocks: Sequence[int | str] | None,
                 grid: tuple[int, int]) -> None:
        if concepts.ndim != 3 or concepts.shape[1] < 1:
            raise EmergentSegError(f"concepts must be [B, n_concepts, context_dim], got {tuple(concepts.shape)}")
        context_dim = self._context_dim(net)
        if int(concepts.shape[-1]) != context_dim:
            raise EmergentSegError(f"concept embeddings have {concepts.shape[-1]} channels but the model's text "
                                   f"context has {context_dim}; encode the words with this model's text encoder")
        self.net, self.concepts = net, concepts
        depth = len(self._blocks(net))
        self.chosen = _block_indices(self._default_blocks(depth) if blocks is None else blocks, depth)
        self.last = self.chosen[-1]
        self.grid = (int(grid[0]), int(grid[1]))
        self.n_image = self.grid[0] * self.grid[1]
        self.states: list[torch.Tensor] = []
        self.seen = {i: 0 for i in self.chosen}
        self._sum: torch.Tensor | None = None
        self._hidden: torch.Tensor | None = None
        self._pending: dict[str, Any] | None = None

    # --- what a subclass says about its architecture -------------------------------------------
    @staticmethod
    def _blocks(net: Any) -> Sequence[Any]:
        raise NotImplementedError

    @staticmethod
    def _context_dim(net: Any) -> int:
        raise NotImplementedError

    @staticmethod
    def _default_blocks(depth: int) -> list[str]:
        return [f"double_block.{i}" for i in range(depth)]

    def _enter(self, concepts: torch.Tensor, args: dict) -> torch.Tensor:
        """The concepts' hidden state before block 0 (``concepts`` already on the text's device/dtype)."""
        raise NotImplementedError

    def _qkv(self, block: Any, hidden: torch.Tensor, args: dict) -> tuple:
        """``(q, k, v, context)``: the concepts' q/k/v ``[B, heads, C, d]`` as the block makes them
        for its text, and what :meth:`_update` needs."""
        raise NotImplementedError

    def _update(self, block: Any, hidden: torch.Tensor, attn: torch.Tensor, context: Any) -> torch.Tensor:
        """The concepts' hidden state after the block, from their attention output ``[B, C, H*d]``."""
        raise NotImplementedError

    @staticmethod
    def _image_start(block: Any, text: int) -> int:
        return text

    # --- hooks ---------------------------------------------------------------------------------
    def install(self, patcher: Any) -> None:
        """Install the stream's hooks on ``patcher`` (a clone: its ``model_options`` change)."""
        options = patcher.model_options.setdefault("transformer_options", {})
        existing = options.get("patches_replace", {}).get("dit", {})
        previous = options.get("optimized_attention_override")
        for i in range(self.last + 1):
            patcher.set_model_patch_replace(self.block_patch(i, existing.get(("double_block", i))), "dit",
                                            "double_block", i)
        patcher.model_options["transformer_options"]["optimized_attention_override"] = \
            self.attention_override(previous)

    def block_patch(self, index: int, chained: Callable | None = None) -> Callable:
        """The ``("double_block", index)`` replace patch: concepts' q/k/v before the block, the
        concept residual update after it; the block itself runs through ``chained`` (a patch
        another pack installed) or ComfyUI's ``original_block``, with the arguments untouched."""
        def patch(args: dict, extra: dict) -> dict:
            import comfy.model_management as mm
            mm.throw_exception_if_processing_interrupted()
            if index <= self.last:
                self._prepare(index, args)
            out = chained(args, extra) if chained is not None else extra["original_block"](args)
            if index <= self.last:
                self._finish(index)
            return out
        return patch

    def attention_override(self, previous: Callable | None = None) -> Callable:
        """The ``optimized_attention_override``: hands every call on unchanged (to ``previous`` or the
        host's attention) and, on the running block's joint attention, computes the concepts'
        attention and, for a chosen block, its map."""
        def override(func: Callable, *args: Any, **kwargs: Any) -> Any:
            out = previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)
            pending = self._pending
            if pending is not None and not pending["done"]:
                q = _heads_first(args[0], kwargs, args)
                if q.shape[2] >= pending["txt"] + self.n_image:        # the block's joint attention
                    self._attend(pending, _heads_first(args[1], kwargs, args), _heads_first(args[2], kwargs, args),
                                 _output_tokens_last(out, kwargs))
            return out
        return override

    # --- the concept stream --------------------------------------------------------------------
    def _prepare(self, index: int, args: dict) -> None:
        img, txt = args["img"], args["txt"]
        b = int(img.shape[0])
        if int(img.shape[1]) < self.n_image:
            raise EmergentSegError(f"the model has {img.shape[1]} image tokens, fewer than the {self.grid[0]}x"
                                   f"{self.grid[1]} grid given for the concept maps")
        if index == 0:                                               # a new pass: the concepts enter
            if self.concepts.shape[0] not in (1, b):
                raise EmergentSegError(f"{self.concepts.shape[0]} sets of concept embeddings for a batch of {b}")
            self._hidden = self._enter(self.concepts.to(txt.device, txt.dtype).expand(b, -1, -1), args)
            self.states = []
        if self._hidden is None or self._hidden.shape[0] != b:
            raise EmergentSegError(f"double block {index} ran before block 0 or with another batch; the concept "
                                   f"stream follows one forward at a time")
        block = self._blocks(self.net)[index]
        q, k, v, context = self._qkv(block, self._hidden, args)
        self._pending = {"index": index, "block": block, "context": context, "q": q, "k": k, "v": v,
                         "txt": int(txt.shape[1]), "start": self._image_start(block, int(txt.shape[1])),
                         "done": False, "attn": None}

    def _attend(self, pending: dict, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> None:
        """Concept queries over [concept keys, image keys] (float32), and the block's map."""
        image = slice(pending["start"], pending["start"] + self.n_image)
        keys = torch.cat((pending["k"].float(), k[:, :, image].float()), dim=2)
        values = torch.cat((pending["v"].float(), v[:, :, image].float()), dim=2)
        attn = F.scaled_dot_product_attention(pending["q"].float(), keys, values)     # [B, H, C, D]
        b, h, c, d = attn.shape
        attn = attn.transpose(1, 2).reshape(b, c, h * d)
        pending["attn"], pending["done"] = attn, True
        index = pending["index"]
        if index in self.seen:
            maps = concept_scores(out[:, image], attn)
            self._sum = maps if self._sum is None else self._sum + maps.to(self._sum.device)
            self.seen[index] += 1

    def _finish(self, index: int) -> None:
        pending, self._pending = self._pending, None
        if pending is None or not pending["done"]:
            raise EmergentSegError(f"double block {index} ran without its joint attention passing through "
                                   f"ComfyUI's attention override (another node replaced the block or the "
                                   f"attention); concept maps cannot be read from this model setup")
        hidden = self._hidden
        hidden = self._update(pending["block"], hidden, pending["attn"].to(hidden.dtype), pending["context"])
        if hidden.dtype == torch.float16:
            hidden = torch.nan_to_num(hidden, nan=0.0, posinf=65504, neginf=-65504)
        self._hidden = hidden
        self.states.append(hidden)

    def result(self) -> torch.Tensor:
        """``[B, n_image, n_concepts]`` float32: the mean over chosen blocks (and passes) of each
        block's softmax-over-concepts map; image tokens row-major over the grid; rows sum to 1."""
        counts = set(self.seen.values())
        if self._sum is None or len(counts) != 1 or 0 in counts:
            raise EmergentSegError(f"not every chosen block contributed a concept map equally often: {self.seen}")
        return self._sum / (len(self.seen) * counts.pop())


class FluxConceptStream(ConceptStream):
    """:class:`ConceptStream` for Flux (``comfy.ldm.flux.model.Flux``): ``txt_in``, then per double
    block ``txt_mod``/``txt_norm1``/``txt_attn`` (qkv, q/k norm, RoPE of position 0)/``proj`` with the
    gate/``txt_norm2``/``txt_mlp`` with the gate, as ``DoubleStreamBlock.forward`` does for text.

    Args:
        net: the Flux diffusion model (``model.model.diffusion_model``).
        concepts: ``[B or 1, n_concepts, context_dim]`` concept embeddings in the space of the
            model's text context ``c_crossattn`` (see :func:`clip_concept_embeddings`).
        blocks: double blocks whose maps are averaged (``"double_block.i"`` or ``i``); ``None`` =
            the last four (ConceptAttention's 15-18 of 19).
        grid: ``(h, w)`` image-token grid (latent size / patch size).
        y: the pooled vector the pass gives the model (``model_kwargs["y"]``), needed for
            ``pooled="zero"``; ``None`` when the model gets none (then ``vec`` already has a zero one).
        pooled: ``"zero"`` (ConceptAttention: the concepts are modulated as if the pooled text
            vector were zero) or ``"prompt"`` (the model's own ``vec``, as for the prompt's text).
    """

    def __init__(self, net: Any, concepts: torch.Tensor, blocks: Sequence[int | str] | None,
                 grid: tuple[int, int], y: torch.Tensor | None = None, pooled: str = "zero") -> None:
        if pooled not in POOLED_MODES:
            raise EmergentSegError(f"pooled must be one of {POOLED_MODES}, got {pooled!r}")
        super().__init__(net, concepts, blocks, grid)
        self.y, self.pooled = y, pooled
        self._vec: torch.Tensor | None = None
        self._pe: torch.Tensor | None = None

    @staticmethod
    def _blocks(net: Any) -> Sequence[Any]:
        return net.double_blocks

    @staticmethod
    def _context_dim(net: Any) -> int:
        return int(net.params.context_in_dim)

    @staticmethod
    def _default_blocks(depth: int) -> list[str]:
        return default_concept_blocks(depth)

    @staticmethod
    def _image_start(block: Any, text: int) -> int:
        return 0 if getattr(block, "flipped_img_txt", False) else text

    def _concept_vec(self, vec: torch.Tensor) -> torch.Tensor:
        """ConceptAttention's ``concept_vec``: ``vec`` with ``vector_in(0)`` for ``vector_in(y)``."""
        if self.pooled == "prompt" or self.y is None:
            return vec
        vin = self.net.vector_in
        y = self.y.to(vec.device, vec.dtype)[:, :self.net.params.vec_in_dim]
        delta = vin(torch.zeros_like(y)).float() - vin(y).float()
        return (vec.float() + delta).to(vec.dtype)

    def _enter(self, concepts: torch.Tensor, args: dict) -> torch.Tensor:
        self._vec = self._concept_vec(args["vec"])
        self._pe = None
        if args.get("pe") is not None:                               # concept ids are 0
            ids = torch.zeros(1, concepts.shape[1], len(self.net.params.axes_dim), device=concepts.device)
            self._pe = self.net.pe_embedder(ids).to(args["pe"].device)
        return self.net.txt_in(concepts)

    def _qkv(self, block: Any, hidden: torch.Tensor, args: dict) -> tuple:
        mod1, mod2 = block.txt_mod(self._vec)
        x = _apply_mod(block.txt_norm1(hidden), 1 + mod1.scale, mod1.shift)
        qkv = block.txt_attn.qkv(x)
        q, k, v = qkv.view(hidden.shape[0], hidden.shape[1], 3, block.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = block.txt_attn.norm(q, k, v)
        if self._pe is not None:
            q, k = _rope(q, self._pe), _rope(k, self._pe)
        return q, k, v, (mod1, mod2)

    def _update(self, block: Any, hidden: torch.Tensor, attn: torch.Tensor, context: Any) -> torch.Tensor:
        mod1, mod2 = context
        hidden = hidden + _apply_mod(block.txt_attn.proj(attn), mod1.gate)
        return hidden + _apply_mod(block.txt_mlp(_apply_mod(block.txt_norm2(hidden), 1 + mod2.scale, mod2.shift)),
                                   mod2.gate)


class MMDiTConceptStream(ConceptStream):
    """:class:`ConceptStream` for SD3/SD3.5 (``comfy.ldm.modules.diffusionmodules.mmdit.MMDiT``):
    ``context_embedder``, then per joint block the ``context_block``'s own ``pre_attention`` (adaLN
    modulation from the block's ``c``, qkv, q/k norm) and ``post_attention`` (proj, gates, MLP), as
    ``_block_mixing`` runs them for the prompt. No rotary embedding (SD3 adds positions to the image).
    The last block's ``context_block`` is ``pre_only``: its map is read, the stream ends there.

    ConceptAttention's SD3 code differs in ways not reproduced here (the Flux recipe is kept for
    both): its concepts are modulated with the prompt's ``temb`` (so is this: there is no pooled
    option), but its image vectors come from a second attention call in which the image also
    attends the concepts, the first concept token is dropped, concept vectors are L2-normalised,
    and all layers are averaged by default (so are they here: ``blocks=None`` = every joint block).

    Args: as :class:`FluxConceptStream`, without ``y``/``pooled``.
    """

    def __init__(self, net: Any, concepts: torch.Tensor, blocks: Sequence[int | str] | None,
                 grid: tuple[int, int]) -> None:
        if getattr(net, "context_processor", None) is not None:
            raise UnsupportedModelError("this MMDiT runs a context processor over the whole prompt; concept "
                                        "tokens alone cannot be put through it")
        super().__init__(net, concepts, blocks, grid)

    @staticmethod
    def _blocks(net: Any) -> Sequence[Any]:
        return net.joint_blocks

    @staticmethod
    def _context_dim(net: Any) -> int:
        embedder = net.context_embedder
        return int(embedder.in_features if hasattr(embedder, "in_features") else net.hidden_size)

    def _enter(self, concepts: torch.Tensor, args: dict) -> torch.Tensor:
        return self.net.context_embedder(concepts)

    def _qkv(self, block: Any, hidden: torch.Tensor, args: dict) -> tuple:
        cb = block.context_block
        (q, k, v), context = cb.pre_attention(hidden, args["vec"])
        b, c = hidden.shape[:2]
        heads = cb.attn.num_heads
        q, k = (t.view(b, c, heads, -1).transpose(1, 2) for t in (q, k))
        return q, k, v.reshape(b, c, heads, -1).transpose(1, 2), context

    def _update(self, block: Any, hidden: torch.Tensor, attn: torch.Tensor, context: Any) -> torch.Tensor:
        if block.context_block.pre_only:
            return hidden
        return block.context_block.post_attention(attn, *context)


def _apply_mod(x: torch.Tensor, mult: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
    from comfy.ldm.flux.layers import apply_mod
    return apply_mod(x, mult, add)


def _net(model: Any) -> Any:
    return getattr(getattr(model, "model", None), "diffusion_model", None)


def _concept_pass(model: Any, stream_for: Callable[[tuple[int, int]], ConceptStream], latents: torch.Tensor,
                  model_kwargs: dict[str, Any], sigma: float, seed: int) -> torch.Tensor:
    """One pass at ``sigma`` with the stream ``stream_for(grid)`` installed on a clone of ``model``."""
    net = _net(model)
    if latents.ndim != 4:
        raise EmergentSegError(f"latents must be [B,C,h,w], got shape {tuple(latents.shape)}")
    if not 0.0 < float(sigma) <= 1.0:
        raise EmergentSegError(f"sigma must be in (0, 1] for a rectified-flow model, got {sigma}")
    patch = int(net.patch_size)
    h, w = latents.shape[-2:]
    if h % patch or w % patch:
        raise EmergentSegError(f"latent {w}x{h} is not a multiple of the model's {patch}x{patch} patches")
    stream = stream_for((h // patch, w // patch))
    clone = model.clone()
    stream.install(clone)
    run_dit_pass(clone, latents, model_kwargs, sigma, seed)
    return stream.result().to(latents.device)


def flux_concept_maps(model: Any, latents: torch.Tensor, model_kwargs: dict[str, Any], sigma: float,
                      concepts: torch.Tensor, blocks: Sequence[int | str] | None = None, seed: int = 0,
                      pooled: str = "zero") -> torch.Tensor:
    """One Flux pass at noise level ``sigma`` with the concept stream beside it; returns the maps.

    Noise is added exactly as ``comfy_backend.capture_dit_attention`` does
    (``model_sampling.noise_scaling`` with ``torch.randn`` from ``seed``), so the two can share a pass.

    Args:
        model: the user's ModelPatcher (cloned, never modified).
        latents: ``[B, C, h, w]`` model-space latents (``process_latent_in`` applied); ``h``/``w``
            multiples of the patch size.
        model_kwargs: what ``apply_model`` takes besides ``x``/``t`` (``c_crossattn``, ``y``,
            ``guidance``, ``ref_latents``, ...).
        sigma: in (0, 1]; ConceptAttention uses :data:`CONCEPT_ATTENTION_SIGMA`.
        concepts: ``[B or 1, n_concepts, context_dim]`` embeddings (:func:`clip_concept_embeddings`).
        blocks: double blocks to average; ``None`` = the last four.
        pooled: see :class:`FluxConceptStream`.

    Returns:
        ``[B, h/p * w/p, n_concepts]`` float32, rows summing to 1: what ``core.capture.CrossAttentionLevel``
        carries as ``maps`` (``CrossAttentionLevel(grid, len(blocks), maps)``, words ``{word: [j]}``).
    """
    from comfy.ldm.flux.layers import DoubleStreamBlock
    from comfy.ldm.flux.model import Flux

    net = _net(model)
    if not isinstance(net, Flux) or not all(isinstance(b, DoubleStreamBlock) for b in net.double_blocks):
        raise UnsupportedModelError(f"{type(net).__name__} is not a Flux model; these concept maps need Flux's "
                                    f"double-stream blocks")
    return _concept_pass(model, lambda grid: FluxConceptStream(net, concepts, blocks, grid, y=model_kwargs.get("y"),
                                                               pooled=pooled),
                         latents, model_kwargs, sigma, seed)


def mmdit_concept_maps(model: Any, latents: torch.Tensor, model_kwargs: dict[str, Any], sigma: float,
                       concepts: torch.Tensor, blocks: Sequence[int | str] | None = None,
                       seed: int = 0) -> torch.Tensor:
    """:func:`flux_concept_maps` for SD3/SD3.5 (MMDiT); ``blocks=None`` = every joint block."""
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    net = _net(model)
    if not isinstance(net, MMDiT):
        raise UnsupportedModelError(f"{type(net).__name__} is not an SD3 (MMDiT) model")
    return _concept_pass(model, lambda grid: MMDiTConceptStream(net, concepts, blocks, grid), latents,
                         model_kwargs, sigma, seed)


def clip_concept_embeddings(clip: Any, words: Sequence[str], key: str | None = None,
                            reduce: str = "first") -> torch.Tensor:
    """One embedding per word from a ComfyUI CLIP object, in the space of the model's text context.

    Each word is tokenized and encoded alone (``clip.tokenize(word, return_word_ids=True)``,
    ``clip.encode_from_tokens``); the positions of the word's own tokens are those whose ComfyUI
    word id is non-zero (start/end/padding tokens have 0). ``reduce="first"`` keeps the hidden
    state of the first of them (ConceptAttention: T5 on the word, ``[0, 0, :]``; T5 has no start
    token, so that is the word's first token), ``"mean"`` averages them.

    Works when the encoded context is one tokenizer's output -- Flux (T5 only: ``key`` defaults to
    ``"t5xxl"`` when the tokenization has it) and single-encoder models -- and for SD3/SD3.5,
    whose context is the CLIP-L/G sequence (both encoders side by side in the channels) followed
    by the T5 sequence: the word's T5 token when T5 is loaded, else its CLIP token.

    Returns:
        ``[1, len(words), context_dim]`` on the encoder's output device.
    """
    if not words:
        raise EmergentSegError("give at least one concept word")
    if reduce not in ("first", "mean"):
        raise EmergentSegError(f"reduce must be 'first' or 'mean', got {reduce!r}")
    out = []
    for word in words:
        tokens = clip.tokenize(word, return_word_ids=True)
        flats = {name: [t for chunk in chunks for t in chunk] for name, chunks in tokens.items()}
        name = key or ("t5xxl" if "t5xxl" in tokens else (next(iter(tokens)) if len(tokens) == 1 else None))
        if name not in tokens:
            raise EmergentSegError(f"cannot tell which of the tokenizations {sorted(tokens)} makes the text "
                                   f"context; pass key=")
        cond = clip.encode_from_tokens(tokens)
        length = int(cond.shape[1]) if cond.ndim == 3 else -1
        clip_side = len(flats.get("l", flats.get("g", [])))
        offset = 0
        if length != len(flats[name]) and key is None and clip_side:
            if name == "t5xxl" and length == clip_side + len(flats[name]):   # SD3: CLIP then T5
                offset = clip_side
            elif length == clip_side:                                         # SD3 without T5
                name = "l" if "l" in flats else "g"
        flat = flats[name]
        if length != offset + len(flat):
            raise EmergentSegError(f"the encoded context ({tuple(cond.shape)}) does not line up with the "
                                   f"{len(flat)} '{name}' tokens; this text encoder is not supported")
        positions = [i for i, t in enumerate(flat) if len(t) > 2 and int(t[2]) > 0]
        if not positions:
            raise EmergentSegError(f"the concept {word!r} encodes to no tokens of its own")
        positions = [offset + i for i in positions]
        emb = cond[0, positions[0]] if reduce == "first" else cond[0, positions].mean(0)
        out.append(emb)
    return torch.stack(out).unsqueeze(0)


def capture_with_words(backend: Any, latents: torch.Tensor, cond: Any, sigma: float, blocks: list[str],
                       image_size: tuple[int, int], words: Sequence[str], seed: int = 0) -> Any:
    """Capture Attention on a DiT (``comfy_backend.ComfyDitBackend.capture``) with each of ``words``
    run as a concept token in the same pass; the per-word maps become the capture's
    cross-attention, so KL Merge names segments after the words. Models whose blocks have no
    per-block text modulation (Chroma) are captured without words, with a warning."""
    import logging
    from dataclasses import replace

    from comfy.ldm.flux.model import Flux

    from ..core.capture import CrossAttentionLevel

    net = backend.model.model.diffusion_model
    if backend.family == "flux" and not isinstance(net, Flux):
        logging.getLogger("emergent_seg").warning(
            "emergent_seg: %s has no per-block text modulation for concept tokens; segments are not "
            "named after prompt words", type(net).__name__)
        return backend.capture(latents, cond, sigma, blocks, image_size, seed=seed)
    if backend.clip is None:
        raise EmergentSegError("naming segments after words needs the checkpoint's CLIP")
    grid = (int(latents.shape[-2]) // backend.patch, int(latents.shape[-1]) // backend.patch)
    streams: list[ConceptStream] = []

    def install(kwargs: dict[str, Any]) -> list[Callable[[Any], None]]:
        concepts = clip_concept_embeddings(backend.clip, list(words)).to(kwargs["c_crossattn"].device, torch.float32)
        if backend.family == "flux":
            streams.append(FluxConceptStream(net, concepts, None, grid, y=kwargs.get("y")))
        else:
            streams.append(MMDiTConceptStream(net, concepts, None, grid))
        return [streams[0].install]

    cap = backend.capture(latents, cond, sigma, blocks, image_size, seed=seed, also=install)
    maps = streams[0].result().to(cap.self_attention.device)
    level = CrossAttentionLevel(grid, len(streams[0].chosen), maps)
    return replace(cap, cross=(level,), tokens=tuple(words), prompt=" ".join(words))
