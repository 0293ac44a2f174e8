"""Default settings of a run, in one place: the values measured for a model and stored beside it
(``backend.calibration``, read from a model folder's ``emergent_seg.json``), else the papers'.

The CLI, the evaluation harness and the Python API all ask here, so ``segment`` and ``eval`` run a
model with the same settings.
"""
from __future__ import annotations

from dataclasses import dataclass

from .capture import DIFFSEG_TIMESTEP
from .emerdiff import DEFAULT_K, DEFAULT_SIGMA, QUALITY_PRESETS

#: DiffSeg's KL threshold on COCO-Stuff-27 (0.9 on Cityscapes), for SD1.x.
PAPER_TAU = 1.1
PAPER_TAU_CITYSCAPES = 0.9
#: The mapper preset used when a model stores none.
DEFAULT_QUALITY = "fast"


def _calibration(backend: object) -> dict:
    return dict(getattr(backend, "calibration", None) or {})


def diffseg_threshold(backend: object, dataset: str = "coco") -> tuple[float | None, float | None]:
    """``(tau, tau_quantile)``, exactly one set: the model's stored value, else the paper's tau."""
    cal = _calibration(backend)
    if "tau" in cal:
        return float(cal["tau"]), None
    if "tau_quantile" in cal:
        return None, float(cal["tau_quantile"])
    return (PAPER_TAU_CITYSCAPES if dataset == "cityscapes" else PAPER_TAU), None


def diffseg_timestep(backend: object) -> int:
    return int(_calibration(backend).get("timestep", DIFFSEG_TIMESTEP))


@dataclass(frozen=True)
class EmerDiffDefaults:
    """EmerDiff's settings for one model and processing size."""

    clusters: int
    quality: str
    sigma: float

    def mapper_kwargs(self) -> dict:
        """Keyword arguments for ``core.emerdiff.modulated_denoise_mapper``/``emerdiff``."""
        return {**QUALITY_PRESETS[self.quality], "sigma": self.sigma}


def emerdiff_defaults(backend: object, image_side: int) -> EmerDiffDefaults:
    """K, mapper preset and smoothing sigma (pixels at ``image_side``): the model's stored values
    (sigma stored at its native size and scaled), else K = 20, ``fast`` and 4 px at 512 px."""
    cal = _calibration(backend)
    quality = str(cal.get("mapper_quality", DEFAULT_QUALITY))
    if quality not in QUALITY_PRESETS:
        quality = DEFAULT_QUALITY
    if "mapper_sigma" in cal:
        sigma = float(cal["mapper_sigma"]) * image_side / float(cal.get("native_size", image_side))
    else:
        sigma = DEFAULT_SIGMA * image_side / 512
    return EmerDiffDefaults(int(cal.get("emerdiff_k", DEFAULT_K)), quality, sigma)
