"""Every setting of a run, and the one place its defaults come from.

:class:`DiffSegSettings` and :class:`EmerDiffSettings` are frozen and keyword-only, and check their
values when built, so a bad value fails before any model work with one line. :func:`defaults_for`
gives both for a backend: the values measured for a model and stored beside it
(``backend.calibration``, read from a model folder's ``emergent_seg.json``), else the papers'. The
CLI, the ComfyUI nodes, the evaluation harness and the Python API all build their runs from it.

The papers' constants are named here once; ``core/emerdiff.py`` and ``core/capture.py`` import
them. Where a constant is our choice rather than a paper's, the comment says why.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal, Mapping

from .errors import EmergentSegError

InjectMode = Literal["all", "self", "cross", "none"]
DifferenceMode = Literal["symmetric", "one_sided"]
MapperQuality = Literal["fast", "faithful", "fast-symmetric"]

# --- DiffSeg ---------------------------------------------------------------------------------
#: DiffSeg's capture timestep (official code: t = 300 of 1000).
DIFFSEG_TIMESTEP = 300
#: DiffSeg's KL threshold on COCO-Stuff-27 (0.9 on Cityscapes), for SD1.x.
PAPER_TAU = 1.1
PAPER_TAU_CITYSCAPES = 0.9
#: Merge iterations N and anchors per side of the official code.
PAPER_ITERATIONS = 3
PAPER_ANCHORS_PER_SIDE = 16

# --- EmerDiff --------------------------------------------------------------------------------
#: Token-grid side of the decoder block that gives features and takes the modulation. The paper
#: uses SD1.x's 16x16 block at 512 px, i.e. the grid at 1/32 of the image side. 0 (the default) =
#: that ratio at any size and model: the decoder grid nearest to image side / 32 (16x16 for SD1.x
#: at 512 px, 32x32 for SDXL at 1024 px, 8x8 for the embedded 256 px model). A positive value asks
#: for the decoder grid nearest to that side instead.
DEFAULT_GRID = 0
#: The paper's feature grid as a fraction of the image side (16 / 512).
GRID_FRACTION = 1 / 32
#: Which spatial transformer of that grid's decoder blocks (0 = first). The paper reads features
#: from the first cross-attention layer; it does not say which layer it modulates (it compares
#: the three), so the same first layer is used.
DEFAULT_LAYER = 0
#: Transformer block inside that spatial transformer (SD1.x has depth 1; SDXL 2-10).
DEFAULT_DEPTH = 0
#: Feature timestep t_f = 1 (the paper: larger t_f is worse).
PAPER_T_F = 1
#: Modulation timestep t_m = 281 (the paper: 281-481 work best).
PAPER_T_M = 281
#: Modulation strength lambda = 10.
PAPER_LAMBDA = 10.0
#: K is 10-40 in the paper with small changes; it names no default, so 20.
DEFAULT_K = 20
#: The paper's denoising from t_m = 281 on the 50-step grid {981, ..., 21, 1}: 281, 261, ..., 1 =
#: 15 passes.
PAPER_STEPS = 15
#: Our one-step option: one pass at t_m, decode its x0 prediction.
FAST_STEPS = 1
#: The mapper presets: one vocabulary for the node's ``quality``, the CLI's and eval's
#: ``--quality``, and the stored calibration. Steps and difference of each:
#: "fast" (ours): one pass at t_m, decode the x0 prediction, d = ||I+ - I_ref|| -> K+1 UNet
#: evaluations per image when max_batch >= K+1 (K = 20: 21 against the paper's 630).
#: "faithful": the paper's 15 DDIM steps t_m = 281 -> 1 and d = ||I- - I+|| (2K+1 per step).
#: "fast-symmetric" (ours): one pass with the paper's symmetric difference (2K+1 evaluations).
QUALITY_PRESETS: dict[str, dict[str, Any]] = {
    "fast": {"steps": FAST_STEPS, "difference": "one_sided"},
    "faithful": {"steps": PAPER_STEPS, "difference": "symmetric"},
    "fast-symmetric": {"steps": FAST_STEPS, "difference": "symmetric"},
}
#: The preset used when a model stores none (the node's default).
DEFAULT_QUALITY: MapperQuality = "fast"
INJECT_MODES: tuple[str, ...] = ("all", "self", "cross", "none")
#: Injection sites: the paper injects attention maps (it helps fine structure) but does not say
#: which layers or steps -> all sites, all steps.
DEFAULT_INJECT: InjectMode = "all"
DEFAULT_INJECT_ALL_STEPS = True
#: Gaussian sigma in image pixels, applied to the difference maps (not to the masks: blurring a
#: mask would change what is modulated). The paper gives none; 4 px at 512 px is small next to the
#: 32 px cells, so it smooths decoder noise and cell-edge staircases, not the segments. 0 = off.
DEFAULT_SIGMA = 4.0
#: Batch members per UNet call including the reference: K = 20 -> 40 runs in 2 chunks (5 %
#: reference overhead). Lower it when a chunk does not fit in memory.
DEFAULT_MAX_BATCH = 21


# --- DiT hosts (Flux, SD3/SD3.5) ------------------------------------------------------------
@dataclass(frozen=True)
class DitPreset:
    """Provisional DiffSeg defaults for a DiT family. Chosen by reasoning, not measured: no real
    Flux or SD3 weights exist where this project is tested, so treat them as starting points and
    tune ``levels`` and ``sigma`` on your own model.

    Attributes:
        sigma: the rectified-flow noise level of the pass, in (0, 1]. A DiT's time embedding is
            the noise level (x = sigma*noise + (1-sigma)*image), not SD's t = 300 of 1000.
        double: the joint (double) blocks to read, as a fraction range of their count, so that
            one preset serves every depth (Flux dev/schnell: 19; SD3 medium: 24; SD3.5 large: 38).
        single: the same for Flux's single blocks (none by default).
    """

    family: str
    sigma: float
    double: tuple[float, float]
    single: tuple[float, float] = (0.0, 0.0)

    def blocks(self, n_double: int, n_single: int = 0) -> list[str]:
        """Block names (``double_block.i``, ``single_block.i``) for a model of this depth; at
        least one block whenever the model has any."""
        def take(lo: float, hi: float, n: int) -> list[int]:
            first, last = int(lo * n), round(hi * n)
            return list(range(first, max(last, first + 1))) if hi > lo and n else []
        names = [f"double_block.{i}" for i in take(*self.double, n_double)]
        names += [f"single_block.{i}" for i in take(*self.single, n_single)]
        return names or [f"double_block.{max(n_double - 1, 0) // 2}"]


#: Flux: the later half of the double blocks, where image and text streams have mixed most
#: while keeping separate weights; SD3/SD3.5: the middle half of the joint blocks (the first ones
#: still see near-raw patches, the last ones are specialised for denoising detail). sigma 0.3 puts
#: the pass at the same relative place in the schedule as DiffSeg's t = 300 of 1000.
DIT_PRESETS: dict[str, DitPreset] = {
    "flux": DitPreset("flux", sigma=0.3, double=(0.5, 1.0)),
    "sd3": DitPreset("sd3", sigma=0.3, double=(0.25, 0.75)),
}


def dit_preset(family: str) -> DitPreset:
    if family not in DIT_PRESETS:
        raise EmergentSegError(f"no DiT preset for {family!r}; known: {', '.join(DIT_PRESETS)}")
    return DIT_PRESETS[family]


def preset(name: str) -> dict[str, Any]:
    """``{"steps", "difference"}`` of a :data:`QUALITY_PRESETS` entry (a copy)."""
    if name not in QUALITY_PRESETS:
        raise EmergentSegError(f"unknown quality {name!r}; use one of: {', '.join(QUALITY_PRESETS)}")
    return dict(QUALITY_PRESETS[name])


@dataclass(frozen=True, kw_only=True)
class DiffSegSettings:
    """DiffSeg's knobs; the defaults are the official code's (COCO-Stuff-27 benchmark).

    Exactly one of ``tau`` (fixed KL threshold) and ``tau_quantile`` (that quantile of the
    anchor-to-pixel KL, per image) is used; ``tau_quantile`` wins when both are set.
    """

    timestep: int = DIFFSEG_TIMESTEP
    tau: float | None = PAPER_TAU
    tau_quantile: float | None = None
    iterations: int = PAPER_ITERATIONS
    anchors_per_side: int = PAPER_ANCHORS_PER_SIDE
    mode: str = "fast"
    refine: bool = False
    strides: tuple[int, ...] | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def for_model(cls, backend: object, dataset: str = "coco", **overrides: Any) -> "DiffSegSettings":
        """The settings a model runs with (:func:`defaults_for`); ``overrides`` win, and giving
        ``tau`` or ``tau_quantile`` replaces the stored threshold."""
        base = defaults_for(backend, dataset=dataset).diffseg
        if "tau" in overrides or "tau_quantile" in overrides:
            overrides = {"tau": None, "tau_quantile": None, **overrides}
        return replace(base, **overrides)

    def __post_init__(self) -> None:
        from .diffseg import _check_per_side, _taus

        if self.tau_quantile is not None and self.tau is not None:
            object.__setattr__(self, "tau", None)  # the quantile wins (see the class docstring)
        if self.tau is None and self.tau_quantile is None:
            raise EmergentSegError(f"give tau or tau_quantile (DiffSeg's paper: tau = {PAPER_TAU} on COCO)")
        if self.tau_quantile is not None and not 0.0 < float(self.tau_quantile) <= 1.0:
            raise EmergentSegError(f"tau_quantile must be in (0, 1], got {self.tau_quantile!r}")
        _taus(self.tau if self.tau is not None else 1.0, self.iterations)
        _check_per_side(self.anchors_per_side)
        if self.mode not in ("fast", "parity"):
            raise EmergentSegError(f"mode must be fast or parity, got {self.mode!r}")
        if not 0 <= int(self.timestep) <= 999:
            raise EmergentSegError(f"timestep must be in 0..999, got {self.timestep!r} "
                                   f"(DiffSeg uses {DIFFSEG_TIMESTEP})")


@dataclass(frozen=True, kw_only=True)
class EmerDiffSettings:
    """EmerDiff's knobs: the low-res k-means (``clusters``, ``t_f``, where features are read) and
    the modulated denoising mapper (``quality`` preset, ``lam``, ``t_m``, ``sigma``, injection,
    batching). ``steps``/``difference`` override the preset's when set."""

    clusters: int = DEFAULT_K
    t_f: int = PAPER_T_F
    grid: int | tuple[int, int] = DEFAULT_GRID
    layer: int = DEFAULT_LAYER
    depth: int = DEFAULT_DEPTH
    quality: str = DEFAULT_QUALITY
    steps: int | None = None
    difference: DifferenceMode | None = None
    lam: float = PAPER_LAMBDA
    t_m: int = PAPER_T_M
    sigma: float = DEFAULT_SIGMA
    inject: InjectMode = DEFAULT_INJECT
    inject_all_steps: bool = DEFAULT_INJECT_ALL_STEPS
    max_batch: int = DEFAULT_MAX_BATCH

    @classmethod
    def for_model(cls, backend: object, image_side: int | None = None,
                  **overrides: Any) -> "EmerDiffSettings":
        """The settings a model runs with at ``image_side`` (:func:`defaults_for`); ``overrides``
        win (``None`` values are ignored, so optional CLI flags can be passed straight on)."""
        base = defaults_for(backend, image_side).emerdiff
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def denoise_steps(self) -> int:
        return int(self.steps if self.steps is not None else QUALITY_PRESETS[self.quality]["steps"])

    @property
    def difference_mode(self) -> DifferenceMode:
        return self.difference or QUALITY_PRESETS[self.quality]["difference"]

    @property
    def label(self) -> str:
        """The preset's name, or the step count when ``steps`` overrides it."""
        return self.quality if self.steps is None else str(self.steps)

    def __post_init__(self) -> None:
        preset(self.quality)
        if self.steps is not None and int(self.steps) < 1:
            raise EmergentSegError(f"steps must be >= 1, got {self.steps}")
        if self.difference not in (None, "symmetric", "one_sided"):
            raise EmergentSegError(f"unknown difference {self.difference!r}; use 'symmetric' or 'one_sided'")
        if int(self.clusters) < 1:
            raise EmergentSegError(f"clusters must be at least 1, got {self.clusters} (EmerDiff uses 20 on SD)")
        if float(self.lam) == 0.0:
            raise EmergentSegError("lambda must be non-zero: with lambda = 0 the modulated runs equal the "
                                   "reference and every difference map is zero; EmerDiff uses lambda = 10")
        for name, value, paper in (("t_f", self.t_f, PAPER_T_F), ("t_m", self.t_m, PAPER_T_M)):
            if not 0 <= int(value) <= 999:
                raise EmergentSegError(f"{name} = {value} is outside 0..999; EmerDiff uses {paper}")
        if not float(self.sigma) >= 0:
            raise EmergentSegError(f"sigma must be >= 0 pixels, got {self.sigma}")
        if self.inject not in INJECT_MODES:
            raise EmergentSegError(f"unknown injection mode {self.inject!r}; use one of: {', '.join(INJECT_MODES)}")
        if int(self.max_batch) < 2:
            raise EmergentSegError(f"max_batch = {self.max_batch} leaves no room next to the reference; use >= 2")


@dataclass(frozen=True)
class RunDefaults:
    diffseg: DiffSegSettings
    emerdiff: EmerDiffSettings


def calibration_of(backend: object) -> Mapping[str, Any]:
    """A backend's stored defaults (``Backend.calibration``), ``{}`` for none or no backend."""
    return dict(getattr(backend, "calibration", None) or {})


def defaults_for(backend: object, image_side: int | None = None, dataset: str = "coco") -> RunDefaults:
    """The defaults a model runs with: its stored values, else the papers'.

    DiffSeg: the stored ``tau`` or ``tau_quantile`` and ``timestep``, else tau = 1.1 (0.9 for
    ``dataset="cityscapes"``) at t = 300. EmerDiff: the stored ``emerdiff_k``, ``mapper_quality``
    and ``mapper_sigma`` (stored in pixels at the model's ``native_size`` and scaled to
    ``image_side``), else K = 20, ``fast`` and 4 px at 512 px scaled to ``image_side``.
    """
    cal = calibration_of(backend)
    if "tau" in cal:
        tau, quantile = float(cal["tau"]), None
    elif "tau_quantile" in cal:
        tau, quantile = None, float(cal["tau_quantile"])
    else:
        tau, quantile = (PAPER_TAU_CITYSCAPES if dataset == "cityscapes" else PAPER_TAU), None
    diffseg = DiffSegSettings(timestep=int(cal.get("timestep", DIFFSEG_TIMESTEP)), tau=tau,
                              tau_quantile=quantile)
    side = image_side or int(cal.get("native_size", 512))
    quality = str(cal.get("mapper_quality", DEFAULT_QUALITY))
    if quality not in QUALITY_PRESETS:
        quality = DEFAULT_QUALITY
    if "mapper_sigma" in cal:
        sigma = float(cal["mapper_sigma"]) * side / float(cal.get("native_size", side))
    else:
        sigma = DEFAULT_SIGMA * side / 512
    emerdiff = EmerDiffSettings(clusters=int(cal.get("emerdiff_k", DEFAULT_K)), quality=quality, sigma=sigma)
    return RunDefaults(diffseg, emerdiff)
