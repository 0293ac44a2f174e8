"""Calibration of a model folder's stored defaults (``emergent_seg.json["calibration"]``) on
training-range scenes, never the held-out ones."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..core.backend import Backend, Progress
from ..core.errors import EmergentSegError
from ..core.metrics import instance_scores
from ..core.pipeline import DiffSegSettings

#: First seed of the calibration scenes: inside the training range (below ``EVAL_SEED``), far
#: from the seeds the training script draws (``seed * 1e8 + step * batch + i``, small for seed 0).
CALIBRATION_SEED = 500_000_000


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------

DEFAULT_TAUS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 0.9, 1.1)
DEFAULT_QUANTILES = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
DEFAULT_KS = (2, 3, 4, 5, 6, 8)


def _round_sig(x: float, digits: int = 3) -> float:
    """Round to ``digits`` significant digits, so data-derived thresholds do not depend on
    float noise (e.g. the thread count)."""
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


_Key = tuple[int, str, float]  # (timestep, "tau" or "tau_quantile", value)


def _check_scenes(scenes: Sequence[Any]) -> None:
    from ..fixture.scenes import EVAL_SEED

    if not scenes:
        raise EmergentSegError("calibration needs at least one scene")
    bad = [s.seed for s in scenes if s.seed >= EVAL_SEED]
    if bad:
        raise EmergentSegError(f"calibration scenes must come from the training range (seed < {EVAL_SEED}); "
                               f"got seed {bad[0]}, which is held out for evaluation")


def _search_timestep(backend: Backend, scenes: Sequence[Any], t: int, taus: Sequence[float],
                     quantiles: Sequence[float], iterations: int, anchors_per_side: int, refine: bool,
                     device: Any, progress: Progress, scores: dict[_Key, list[float]],
                     segments: dict[_Key, list[int]]) -> None:
    """The threshold grid search at one timestep: one capture per scene, then every candidate's
    per-scene mIoU and segment count added to ``scores`` and ``segments`` (in the order tried)."""
    from ..core.diffseg import kl_merge, threshold_from_quantile
    from ..core.pipeline import capture

    settings = DiffSegSettings(timestep=int(t))
    caps = []
    for scene in scenes:
        caps.append(capture(backend, scene.image.unsqueeze(0).to(device), settings=settings))
        progress.advance()
    # fixed taus: the given ones plus, per quantile, the median over scenes of that quantile's
    # per-scene threshold (so a fixed tau is tried on the scale of this model's KL values)
    fixed = {float(v) for v in taus}
    for q in quantiles:
        per_scene = [threshold_from_quantile(c.self_attention[0], c.grid, q, anchors_per_side)
                     for c in caps]
        fixed.add(_round_sig(float(np.median(per_scene))))

    def run(kind: str, value: float) -> float:
        key = (int(t), kind, value)
        if key not in scores:
            kw = {"tau": value} if kind == "tau" else {"tau_quantile": value}
            for scene, cap in zip(scenes, caps):
                labels, _ = kl_merge(cap.self_attention, cap.grid, cap.image_size, iterations=iterations,
                                     anchors_per_side=anchors_per_side, **kw)
                scores.setdefault(key, []).append(instance_scores(labels[0].cpu(), scene.labels)["miou"])
                segments.setdefault(key, []).append(int(torch.unique(labels[0]).numel()))
        return float(np.mean(scores[key]))

    for v in sorted(fixed):
        run("tau", v)
    for q in quantiles:
        run("tau_quantile", float(q))
    if refine and fixed:  # one round of finer steps around the best value of each kind
        best_tau = max(sorted(fixed), key=lambda v: run("tau", v))
        for f in (0.8, 0.9, 1.1, 1.25):
            run("tau", _round_sig(best_tau * f))
        if quantiles:
            best_q = max(quantiles, key=lambda q: run("tau_quantile", float(q)))
            for d in (-0.05, -0.025, 0.025, 0.05):
                if 0.0 < best_q + d <= 1.0:
                    run("tau_quantile", round(best_q + d, 4))


def _diffseg_result(scenes: Sequence[Any], scores: dict[_Key, list[float]],
                    segments: dict[_Key, list[int]]) -> dict[str, Any]:
    """The best threshold and timestep (ties keep the earlier candidate) and every candidate's score."""
    mean = {k: float(np.mean(v)) for k, v in scores.items()}
    best = max(mean, key=lambda k: (mean[k], -list(mean).index(k)))
    t_best, kind, value = best
    result: dict[str, Any] = {kind: value, "timestep": t_best, "prompt": "",
                              "metric": "instance mIoU, mean over scenes (evaluation/calibration.py)",
                              "diffseg_score": round(mean[best], 4),
                              "diffseg_segments": round(float(np.mean(segments[best])), 2),
                              "true_segments": round(float(np.mean([s.num_instances + 1 for s in scenes])), 2)}
    result["candidates"] = {
        f"t{t}:{k}={v:g}": {"miou": round(m, 4), "segments": round(float(np.mean(segments[(t, k, v)])), 2)}
        for (t, k, v), m in mean.items()}
    return result


def _emerdiff_k_result(backend: Backend, scenes: Sequence[Any], emerdiff_ks: Sequence[int], device: Any,
                       progress: Progress) -> dict[str, Any]:
    """EmerDiff's best low-res k-means ``K`` (nearest-upsampled masks; ties keep the smaller K)."""
    from ..core.emerdiff import extract_features, kmeans_labels, upsample_labels

    ks: dict[int, list[float]] = {}
    for scene in scenes:
        latents = backend.encode(scene.image.unsqueeze(0).to(device))
        feats = extract_features(backend, latents, seed=0)
        for k in emerdiff_ks:
            if k > feats.grid[0] * feats.grid[1]:
                continue
            low = kmeans_labels(feats.features, feats.grid, k, seed=0)
            up = upsample_labels(low, tuple(scene.labels.shape))[0]
            ks.setdefault(int(k), []).append(instance_scores(up.cpu(), scene.labels)["miou"])
        progress.advance()
    kmean = {k: float(np.mean(v)) for k, v in ks.items()}
    k_best = max(kmean, key=lambda k: (kmean[k], -k))
    return {"emerdiff_k": k_best, "emerdiff_lowres_score": round(kmean[k_best], 4),
            "emerdiff_k_candidates": {str(k): round(v, 4) for k, v in kmean.items()}}


def calibrate(backend: Backend, scenes: Sequence[Any], *, taus: Sequence[float] = DEFAULT_TAUS,
              quantiles: Sequence[float] = DEFAULT_QUANTILES, timesteps: Sequence[int] = (300,),
              emerdiff_ks: Sequence[int] = DEFAULT_KS, iterations: int = 3, anchors_per_side: int = 16,
              refine: bool = True, progress: Progress | None = None) -> dict:
    """Pick the model's DiffSeg defaults on training-range scenes.

    Grid search, scored by instance mIoU (mean over scenes of per-scene Hungarian IoU): every
    fixed ``tau`` in ``taus`` and every ``tau_quantile`` in ``quantiles`` at every timestep in
    ``timesteps`` (one capture per scene and timestep, fast-mode merges; the fixed taus tried also
    include, per quantile, the median over scenes of that quantile's threshold; with ``refine`` one
    more round tries x0.8, x0.9, x1.1, x1.25 the best fixed tau and +-0.025, +-0.05 around the best
    quantile), and EmerDiff's low-res
    k-means ``K`` in ``emerdiff_ks`` (nearest-upsampled masks, no mapper). Ties keep the earlier
    candidate (fixed taus before quantiles, smaller values first).

    Args:
        backend: the model.
        scenes: ``fixture.scenes.Scene`` s with seeds below ``EVAL_SEED`` (checked: the held-out
            range is never used for calibration).

    Returns:
        a JSON-friendly dict for the weights' ``config.json["calibration"]``: exactly one of
        ``tau``/``tau_quantile``, ``timestep``, ``emerdiff_k``, the scores of every candidate and
        the scenes used.
    """
    _check_scenes(scenes)
    progress = progress or Progress()
    progress.grow(len(scenes) * (len(timesteps) + (1 if emerdiff_ks else 0)))
    device = getattr(backend, "device", "cpu")
    scores: dict[_Key, list[float]] = {}
    segments: dict[_Key, list[int]] = {}
    for t in timesteps:
        _search_timestep(backend, scenes, t, taus, quantiles, iterations, anchors_per_side, refine, device,
                         progress, scores, segments)
    result = _diffseg_result(scenes, scores, segments)
    if emerdiff_ks:
        result.update(_emerdiff_k_result(backend, scenes, emerdiff_ks, device, progress))
    seeds = sorted(s.seed for s in scenes)
    result["scenes"] = {"n": len(scenes), "first_seed": seeds[0], "last_seed": seeds[-1],
                        "size": int(scenes[0].image.shape[-1])}
    return result


DEFAULT_MAPPER_QUALITIES = ("fast", "fast-symmetric")
DEFAULT_MAPPER_SIGMAS = (0.0, 2.0, 4.0, 8.0, 12.0, 16.0, 24.0)


def calibrate_mapper(backend: Backend, scenes: Sequence[Any], k: int, *,
                     qualities: Sequence[str] = DEFAULT_MAPPER_QUALITIES,
                     sigmas: Sequence[float] = DEFAULT_MAPPER_SIGMAS, seed: int = 0,
                     progress: Progress | None = None) -> dict:
    """Pick the mapper preset (steps and difference mode) and smoothing sigma on training-range
    scenes: EmerDiff's low-res k-means masks (``k``) through the mapper, scored by instance mIoU,
    next to the nearest and bilinear upsampling of the same masks. Difference maps are computed
    once per scene and preset; every sigma reuses them (smoothing and argmax are cheap). Ties keep
    the cheaper preset and the smaller sigma. Sigma is in pixels at the scenes' size."""
    from ..core import emerdiff as E
    from ..fixture.scenes import EVAL_SEED

    if any(s.seed >= EVAL_SEED for s in scenes):
        raise EmergentSegError("mapper calibration scenes must come from the training range (seed < EVAL_SEED)")
    progress = progress or Progress()
    progress.grow(len(scenes) * len(qualities))
    device = getattr(backend, "device", "cpu")
    scores: dict[str, list[float]] = {}
    for scene in scenes:
        latent = backend.encode(scene.image.unsqueeze(0).to(device))
        low = E.lowres_kmeans(backend, latent, k=k, seed=seed).lowres
        size = tuple(scene.labels.shape)
        for mode in ("nearest", "bilinear"):
            up = E.upsample_labels(low.cpu(), size, mode)[0]
            scores.setdefault(mode, []).append(instance_scores(up, scene.labels)["miou"])
        ids, masks = E.label_masks(low[0])
        for quality in qualities:
            dm = E.difference_maps(backend, latent, masks, seed=seed, **E.preset(quality))
            for sigma in sigmas:
                labels = ids.cpu()[E.assign(E.smooth(dm.maps, float(sigma))).cpu()]
                scores.setdefault(f"{quality}:sigma={float(sigma):g}", []).append(
                    instance_scores(labels, scene.labels)["miou"])
            progress.advance()
    mean = {key: float(np.mean(v)) for key, v in scores.items()}
    mapped = [key for key in mean if ":sigma=" in key]
    best = max(mapped, key=lambda key: (mean[key], -mapped.index(key)))
    quality, sigma = best.split(":sigma=")
    seeds = sorted(s.seed for s in scenes)
    return {"mapper_quality": quality, "mapper_sigma": float(sigma), "mapper_score": round(mean[best], 4),
            "mapper_nearest_score": round(mean["nearest"], 4), "mapper_bilinear_score": round(mean["bilinear"], 4),
            "mapper_candidates": {key: round(v, 4) for key, v in mean.items()},
            "mapper_scenes": {"n": len(scenes), "first_seed": seeds[0], "last_seed": seeds[-1],
                              "size": int(scenes[0].image.shape[-1]), "k": int(k)}}


def write_calibration(directory: str | Path, calibration: dict) -> Path:
    """Merge ``calibration`` into ``directory/emergent_seg.json["calibration"]`` (a model folder's
    stored defaults, read by ``core.backends.loading`` into ``backend.calibration``). A stale
    ``tau``/``tau_quantile`` is removed so exactly one threshold is stored."""
    path = Path(directory) / "emergent_seg.json"
    if not (Path(directory) / "unet").exists():
        raise EmergentSegError(f"{directory} is not a model folder (no unet/); calibrate a trained model folder")
    config = json.loads(path.read_text()) if path.exists() else {}
    stored = dict(config.get("calibration", {}))
    if "tau" in calibration or "tau_quantile" in calibration:
        for key in ("tau", "tau_quantile"):
            stored.pop(key, None)
    stored.update(calibration)
    config["calibration"] = stored
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path
