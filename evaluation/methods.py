"""The methods ``eval`` compares (:data:`METHODS`), and the per-image cache that runs each one
with shared work (latents, features, DiffSeg, low-res k-means) computed once."""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..core.backend import Backend
from ..core.errors import EmergentSegError
from ..core.kmeans import kmeans
from ..core.settings import DiffSegSettings, EmerDiffSettings
from .datasets import Sample, centre_crop_resize

# ---------------------------------------------------------------------------------------------
# Model helpers
# ---------------------------------------------------------------------------------------------

def model_size(backend: Backend) -> int:
    """Native square input side (``core.images.native_side``: the embedded model's 256, SD1.x 512)."""
    from ..core.images import native_side

    return native_side(backend)


def diffseg_settings(backend: Backend, tau: float | None = None, tau_quantile: float | None = None,
                     mode: str = "fast", refine: bool = False, timestep: int | None = None,
                     dataset: str = "synthetic") -> DiffSegSettings:
    """The DiffSeg settings of an eval run: the model's (``DiffSegSettings.for_model``) with the
    options given on the command line."""
    given = {"tau": tau, "tau_quantile": tau_quantile, "timestep": timestep}
    return DiffSegSettings.for_model(backend, dataset, mode=mode, refine=refine,
                                     **{k: v for k, v in given.items() if v is not None})


def emerdiff_settings(backend: Backend | None, size: int, *, quality: str | None = None,
                      steps: int | None = None, clusters: int | None = None,
                      sigma: float | None = None) -> EmerDiffSettings:
    """The EmerDiff settings of an eval run: the model's at ``size`` (``EmerDiffSettings.for_model``)
    with the options given; ``steps`` runs that many denoising steps with the paper's symmetric
    difference instead of the preset's."""
    overrides: dict = {"quality": quality, "clusters": clusters, "sigma": sigma}
    if steps is not None:
        overrides.update(steps=int(steps), difference="symmetric")
    return EmerDiffSettings.for_model(backend, size, **overrides)


def random_backend(backend: Backend, seed: int = 0) -> Backend:
    """The same UNet architecture with freshly initialised (seeded) weights; VAE, text encoder,
    schedule and calibration are shared with ``backend``."""
    from ..core.backends.diffusers import DiffusersBackend

    if not isinstance(backend, DiffusersBackend):
        raise EmergentSegError("the random-weights baseline needs a diffusers backend (CLI models)")
    unet = backend.unet
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rnd = type(unet).from_config(unet.config)
    rnd = rnd.to(backend.device)
    if backend.dtype != torch.float32:
        rnd = rnd.to(dtype=backend.dtype)
    rnd = rnd.eval().requires_grad_(False)
    out = DiffusersBackend(rnd, backend.vae, getattr(backend, "_encode_prompt", None),
                           backend.alphas_cumprod(), backend.prediction_type,
                           backend.scaling_factor if backend.vae is not None else None)
    out.calibration = dict(backend.calibration)
    return out


def _compact(labels: torch.Tensor) -> torch.Tensor:
    return torch.unique(labels, return_inverse=True)[1].to(torch.int64)


def _resize_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return F.interpolate(labels[None, None].float(), size=size, mode="nearest-exact")[0, 0].round().long()


def _resize_image(image: torch.Tensor, size: int) -> torch.Tensor:
    if tuple(image.shape[-2:]) == (size, size):
        return image
    if image.shape[-2] != image.shape[-1]:
        image, _ = centre_crop_resize(image, None, min(image.shape[-2:]))
    return F.interpolate(image.unsqueeze(0), size=(size, size), mode="bilinear", align_corners=False,
                         antialias=image.shape[-1] > size)[0].clamp(0, 1)


def segment_features(labels: torch.Tensor, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Mask embeddings: per segment of ``labels [H, W]`` (ids 0..S-1), the area-weighted mean of
    the cell features ``features [h*w, D]`` (pixel ``(y, x)`` is in cell ``(y*h//H, x*w//W)``)."""
    hh, ww = labels.shape
    gh, gw = grid
    ys = torch.arange(hh) * gh // hh
    xs = torch.arange(ww) * gw // ww
    cell = (ys.view(-1, 1) * gw + xs.view(1, -1)).reshape(-1)
    seg = labels.reshape(-1).cpu()
    s = int(seg.max()) + 1
    counts = torch.bincount(seg * (gh * gw) + cell, minlength=s * gh * gw).view(s, gh * gw).double()
    weights = counts / counts.sum(1, keepdim=True).clamp_min(1)
    return (weights @ features.double().cpu()).float()


def segment_colours(labels: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Mean RGB per segment ``[S, 3]`` (``image [3, H, W]`` at the labels' size)."""
    seg = labels.reshape(-1).cpu()
    s = int(seg.max()) + 1
    px = image.reshape(3, -1).T.double().cpu()
    sums = torch.zeros(s, 3, dtype=torch.float64).index_add_(0, seg, px)
    return (sums / torch.bincount(seg, minlength=s).clamp_min(1).double().unsqueeze(1)).float()


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MethodSpec:
    name: str
    description: str
    embedding: str  # "model" | "random" | "colour"


METHODS: dict[str, MethodSpec] = {m.name: m for m in (
    MethodSpec("diffseg-fast", "DiffSeg, fast (matmul) merge", "model"),
    MethodSpec("diffseg-parity", "DiffSeg, parity (official fp16) merge", "model"),
    MethodSpec("diffseg-refine", "DiffSeg fast + k-means refinement", "model"),
    MethodSpec("emerdiff", "EmerDiff: low-res k-means + modulated denoising mapper", "model"),
    MethodSpec("emerdiff-lowres", "EmerDiff low-res k-means, nearest-upsampled (no mapper)", "model"),
    MethodSpec("emerdiff-lowres-bilinear", "EmerDiff low-res k-means, bilinear-upsampled (no mapper)", "model"),
    MethodSpec("diffseg+mapper", "DiffSeg fast, pooled to the mapper grid, + mapper", "model"),
    MethodSpec("diffseg-pooled", "DiffSeg fast pooled to the mapper grid, nearest-upsampled", "model"),
    MethodSpec("diffseg-pooled-bilinear", "DiffSeg fast pooled to the mapper grid, bilinear-upsampled", "model"),
    MethodSpec("random", "baseline: DiffSeg fast, same architecture with random weights", "random"),
    MethodSpec("color-kmeans", "baseline: k-means on RGB with the true K", "colour"),
    MethodSpec("one-segment", "baseline: one segment per image", "colour"),
)}
DEFAULT_METHODS = ("diffseg-fast", "diffseg-parity", "emerdiff", "diffseg+mapper", "random",
                   "color-kmeans", "one-segment")
_ALIASES = {"colour-kmeans": "color-kmeans", "diffseg": "diffseg-fast", "mapper": "diffseg+mapper",
            "random-weights": "random", "one": "one-segment"}


def parse_methods(text: str | Sequence[str]) -> list[str]:
    names = [t.strip().lower() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    out = []
    for n in names:
        n = _ALIASES.get(n, n)
        if n not in METHODS:
            raise EmergentSegError(f"unknown method {n!r}; choose from {', '.join(METHODS)}")
        if n not in out:
            out.append(n)
    if not out:
        raise EmergentSegError("no method given; e.g. --methods diffseg-fast,color-kmeans")
    return out


class _Runner:
    """What every image of a run shares: the model, its random-weights twin, the settings."""

    def __init__(self, backend: Backend | None, size: int, settings: DiffSegSettings | None,
                 emerdiff: EmerDiffSettings | None, needs_random: bool, seed: int) -> None:
        self.backend = backend
        self.size = size
        self.settings = settings or DiffSegSettings()
        self.emerdiff = emerdiff or EmerDiffSettings.for_model(backend, size)
        self.seed = seed
        self.random = random_backend(backend, seed) if needs_random and backend is not None else None


class _ImageRun:
    """Per-image cache so shared work (latents, features, DiffSeg, low-res k-means) runs once.

    Every cached piece records its *exclusive* time (its wall time minus that of the pieces first
    computed inside it) and the pieces it used, so a method's time is the sum over everything it
    needed, whichever method happened to compute a shared piece first."""

    def __init__(self, ev: _Runner, sample: Sample) -> None:
        self.ev, self.sample = ev, sample
        self.eval_hw = tuple(sample.labels.shape[-2:])
        self.model_image = _resize_image(sample.image, ev.size).unsqueeze(0)
        self.cache: dict[str, Any] = {}
        self.exclusive: dict[str, float] = {}
        self.closure: dict[str, set[str]] = {}
        self._stack: list[dict] = []

    def get(self, key: str, fn: Callable[[], Any]) -> Any:
        if self._stack:
            self._stack[-1]["deps"].add(key)
        if key not in self.cache:
            frame: dict = {"deps": set(), "child": 0.0}
            self._stack.append(frame)
            start = time.perf_counter()
            try:
                value = fn()
            finally:
                self._stack.pop()
            wall = time.perf_counter() - start
            if self._stack:
                self._stack[-1]["child"] += wall
            self.cache[key] = value
            self.exclusive[key] = max(0.0, wall - frame["child"])
            closure: set[str] = set(frame["deps"])
            for d in frame["deps"]:
                closure |= self.closure.get(d, set())
            self.closure[key] = closure
        return self.cache[key]

    def seconds(self, key: str) -> float:
        """Time of ``key`` including every piece it used."""
        return self.exclusive.get(key, 0.0) + sum(self.exclusive.get(d, 0.0) for d in self.closure.get(key, ()))

    # --- shared pieces ------------------------------------------------------------------------
    def latents(self, backend: Backend) -> torch.Tensor:
        return self.get(f"latents:{id(backend)}", lambda: backend.encode(self.model_image.to(
            getattr(backend, "device", "cpu"))))

    def features(self, backend: Backend) -> tuple[torch.Tensor, tuple[int, int]]:
        from ..core.emerdiff import extract_features

        def run() -> tuple[torch.Tensor, tuple[int, int]]:
            f = extract_features(backend, self.latents(backend), seed=0)
            feats = F.normalize(f.features[0].float(), dim=-1).cpu()
            return feats, f.grid
        return self.get(f"features:{id(backend)}", run)

    def diffseg(self, backend: Backend, settings: DiffSegSettings, key: str) -> torch.Tensor:
        from ..core.pipeline import segment_diffseg

        return self.get(key, lambda: segment_diffseg(backend, self.model_image.to(
            getattr(backend, "device", "cpu")), settings=settings).labels[0].cpu())

    def lowres(self) -> Any:
        from ..core.emerdiff import lowres_kmeans

        ev = self.ev
        return self.get("emerdiff-lowres", lambda: lowres_kmeans(
            ev.backend, self.latents(ev.backend), k=ev.emerdiff.clusters, seed=ev.seed))

    def mapper(self, grid_labels: torch.Tensor) -> torch.Tensor:
        from ..core.emerdiff import modulated_denoise_mapper

        ev = self.ev
        seg = modulated_denoise_mapper(ev.backend, self.latents(ev.backend), grid_labels, ev.emerdiff,
                                       seed=ev.seed)
        return seg.labels[0].cpu()

    def pooled(self) -> torch.Tensor:
        from ..core.emerdiff import choose_site, pool_labels

        ev = self.ev

        def run() -> torch.Tensor:
            labels = self.diffseg(ev.backend, ev.settings, "diffseg-fast")
            hw = tuple(self.latents(ev.backend).shape[-2:])
            grid = choose_site(ev.backend, hw).grid(hw)
            return pool_labels(labels, grid)[0]
        return self.get("diffseg-pooled-grid", run)

    # --- methods -----------------------------------------------------------------------------
    def method(self, method: str) -> torch.Tensor:
        """Labels of ``method`` at the model size (cached under ``"method:<name>"``)."""
        return self.get(f"method:{method}", lambda: self._labels(method))

    def _labels(self, method: str) -> torch.Tensor:
        from ..core.emerdiff import upsample_labels

        ev = self.ev
        size = tuple(self.model_image.shape[-2:])
        if method == "diffseg-fast":
            return self.diffseg(ev.backend, ev.settings, method)
        if method == "diffseg-parity":
            return self.diffseg(ev.backend, replace(ev.settings, mode="parity"), method)
        if method == "diffseg-refine":
            return self.diffseg(ev.backend, replace(ev.settings, refine=True), method)
        if method == "random":
            return self.diffseg(ev.random, ev.settings, method)
        if method == "emerdiff-lowres":
            return self.lowres().labels[0].cpu()
        if method == "emerdiff-lowres-bilinear":
            return upsample_labels(self.lowres().lowres[:1].cpu(), size, "bilinear")[0]
        if method == "diffseg-pooled-bilinear":
            return upsample_labels(self.pooled()[None], size, "bilinear")[0]
        if method == "emerdiff":
            return self.mapper(self.lowres().lowres[0])
        if method == "diffseg-pooled":
            return upsample_labels(self.pooled()[None], size)[0]
        if method == "diffseg+mapper":
            return self.mapper(self.pooled())
        if method == "color-kmeans":
            def run() -> torch.Tensor:
                img = self.sample.image
                px = img.reshape(3, -1).T.contiguous().float()
                k = min(self.sample.true_k, px.shape[0])
                return kmeans(px, k, seed=ev.seed)[0].view(img.shape[-2:])
            return run()
        if method == "one-segment":
            return torch.zeros(self.eval_hw, dtype=torch.int64)
        raise EmergentSegError(f"unknown method {method!r}")

    def embeddings(self, method: str, labels: torch.Tensor) -> torch.Tensor:
        spec = METHODS[method]
        if spec.embedding == "colour":
            return segment_colours(labels, self.sample.image)
        backend = self.ev.random if spec.embedding == "random" else self.ev.backend
        feats, grid = self.features(backend)
        return segment_features(labels, feats, grid)
