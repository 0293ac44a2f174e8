"""The one seam between algorithms and hosts.

Algorithms (DiffSeg, EmerDiff) are written once against :class:`Backend`; a backend runs one UNet
pass on a latent, at a timestep, with a conditioning, and lets :class:`PassHooks` observe or
replace attention at named sites and add to a site's output. Backends: diffusers
(``core/backends/diffusers.py``) and ComfyUI's ModelPatcher (``nodes/comfy_backend.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import torch

from .errors import EmergentSegError, Interrupted
from .sites import AttentionSite

# q, k, v: [B, N, heads*dim_head] (already projected) -> [B, Nq, heads*dim_head] (before to_out).
AttentionFn = Callable[[AttentionSite, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# hidden: [B, Nq, C] after to_out, before the residual add -> same shape.
OutputFn = Callable[[AttentionSite, torch.Tensor], torch.Tensor]


@dataclass
class PassHooks:
    """What one UNet pass should do differently, keyed by ``AttentionSite.key``.

    ``attention[key]`` computes the site's attention itself (to capture probabilities or inject
    someone else's); ``output[key]`` post-processes the site's output (EmerDiff's modulation).
    Sites without an entry run the host's own attention untouched.
    """

    attention: dict[str, AttentionFn] = field(default_factory=dict)
    output: dict[str, OutputFn] = field(default_factory=dict)

    def merged(self, other: "PassHooks") -> "PassHooks":
        clash = (self.attention.keys() & other.attention.keys()) | (self.output.keys() & other.output.keys())
        if clash:
            raise ValueError(f"two hooks claim the same sites: {sorted(clash)}")
        return PassHooks({**self.attention, **other.attention}, {**self.output, **other.output})

    def __bool__(self) -> bool:
        return bool(self.attention or self.output)


@dataclass(frozen=True)
class Conditioning:
    """Text conditioning for a pass.

    Attributes:
        context: ``[B or 1, T, D]`` cross-attention context.
        extra: backend-specific extra inputs (SDXL's pooled/size embedding ``y``), batch-first.
        tokens: the token string at each of the T positions (``None`` when unknown, e.g. a ComfyUI
            CONDITIONING without its prompt). Used to map prompt words to token positions.
        prompt: the prompt text, when known.
    """

    context: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: tuple[str, ...] | None = None
    prompt: str | None = None

    def expand(self, batch: int) -> "Conditioning":
        """Broadcast a batch-1 conditioning to ``batch`` (a batch-B one must already match)."""
        def grow(t: torch.Tensor) -> torch.Tensor:
            if t.shape[0] == batch:
                return t
            if t.shape[0] == 1:
                return t.expand(batch, *t.shape[1:])
            raise EmergentSegError(
                f"the conditioning has batch {t.shape[0]} but {batch} images were given; "
                "use one prompt for all images or one per image")
        return Conditioning(grow(self.context), {k: grow(v) for k, v in self.extra.items()},
                            self.tokens, self.prompt)

    def select(self, index: torch.Tensor | list[int]) -> "Conditioning":
        """Pick batch members (after :meth:`expand`)."""
        return Conditioning(self.context[index], {k: v[index] for k, v in self.extra.items()},
                            self.tokens, self.prompt)


@runtime_checkable
class Backend(Protocol):
    """Everything an algorithm needs from a model, and nothing more."""

    #: pixels per latent cell (8 for SD's VAE, 1 for a pixel-space model).
    latent_scale: int
    #: Defaults measured for this model and stored beside it (``emergent_seg.json["calibration"]``:
    #: native_size, tau, timestep, emerdiff_k, mapper_quality, mapper_sigma); ``{}`` when none.
    #: ``core/settings.py`` reads it; nothing else does.
    calibration: Mapping[str, Any]

    def sites(self) -> list[AttentionSite]:
        """All attention sites, in execution order."""

    def size_multiple(self) -> int:
        """Image sides must be multiples of this (64 for SD1.x/SDXL: VAE 8 x UNet 8)."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W]`` in [0,1] -> scaled latent (VAE posterior mean, no sampling)."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> ``[B,3,H,W]`` in [0,1]."""

    def empty_conditioning(self) -> Conditioning:
        """Conditioning of the empty prompt (batch 1)."""

    def encode_prompt(self, prompt: str) -> Conditioning:
        """Conditioning of ``prompt`` (batch 1), with its tokens so segments can be named after
        words. Raises :class:`EmergentSegError` when the backend has no text encoder."""

    def alphas_cumprod(self) -> torch.Tensor:
        """``[T]`` float64 cumulative alphas of the model's DDPM schedule (T = 1000 for SD)."""

    def predict_noise(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                      hooks: PassHooks | None = None) -> torch.Tensor:
        """One UNet pass on the noisy latent ``x_t = sqrt(a)*x0 + sqrt(1-a)*eps`` (no host input
        scaling) at integer ``timesteps`` ``[B]``; returns epsilon (v-prediction models convert).
        Hooks are installed for this call only and removed afterwards, whatever happens."""


@runtime_checkable
class HostBackend(Backend, Protocol):
    """A backend inside a host application that hands over its own data formats (ComfyUI's
    LATENT and CONDITIONING); the nodes' input handling (``nodes/inputs.py``) needs these too."""

    def latent_in(self, samples: torch.Tensor) -> torch.Tensor:
        """The host's raw latent -> the scaled latent :meth:`Backend.encode` would give."""

    def from_conditioning(self, conditioning: Any, prompt: str | None = None) -> Conditioning:
        """The host's conditioning object -> :class:`Conditioning`."""


@dataclass
class Progress:
    """Progress and cancellation for long work, independent of the host.

    ``on_update(done, total)`` is called after each unit; ``is_cancelled()`` is polled by
    :meth:`check`, which raises :class:`Interrupted`. ComfyUI binds these to ``ProgressBar`` and
    ``processing_interrupted``; the CLI to a terminal progress bar.
    """

    total: int = 0
    on_update: Callable[[int, int], None] | None = None
    is_cancelled: Callable[[], bool] | None = None
    done: int = 0

    def check(self) -> None:
        if self.is_cancelled is not None and self.is_cancelled():
            raise Interrupted("cancelled by the user")

    def advance(self, units: int = 1) -> None:
        self.done += units
        if self.on_update is not None:
            self.on_update(min(self.done, max(self.total, self.done)), max(self.total, self.done))
        self.check()

    def grow(self, units: int) -> None:
        """Announce more work (e.g. once the number of layers is known)."""
        self.total += units


def quiet_progress() -> Progress:
    return Progress()


def nearest_fit(height: float, width: float, multiple: int) -> tuple[int, int]:
    """``(h, w)``: each side rounded to the nearest multiple of ``multiple`` (at least one)."""
    return (max(multiple, int(round(height / multiple)) * multiple),
            max(multiple, int(round(width / multiple)) * multiple))


def check_size(backend: Backend, height: int, width: int) -> None:
    """Raise a clear error when an image size does not fit the UNet's downsampling."""
    m = backend.size_multiple()
    if height % m or width % m or height <= 0 or width <= 0:
        h, w = nearest_fit(height, width, m)
        raise EmergentSegError(
            f"image size {width}x{height} is not a multiple of {m}; resize or crop it to {w}x{h}")
