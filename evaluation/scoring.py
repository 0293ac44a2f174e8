"""Scoring: runs the methods over a dataset and accumulates both protocols (see the package
docstring)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from ..core.backend import Backend, Progress
from ..core.errors import EmergentSegError
from ..core.kmeans import kmeans
from ..core.metrics import SegmentationScorer, confusion, instance_scores
from ..core.settings import DiffSegSettings, EmerDiffSettings
from .datasets import EVAL_SIZE, Sample
from .methods import (
    METHODS,
    _compact,
    _ImageRun,
    _resize_labels,
    _Runner,
    diffseg_settings,
    model_size,
    parse_methods,
)


@dataclass
class _Acc:
    """Accumulated scores of one method."""

    per_image: SegmentationScorer
    hists: list[np.ndarray] = field(default_factory=list)
    embeds: list[torch.Tensor] = field(default_factory=list)
    instance: list[float] = field(default_factory=list)
    segments: list[int] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Evaluation:
    """Result of :func:`evaluate`: ``rows`` (one dict per method, JSON-friendly) and the run's
    settings in ``meta``. :func:`format_table` renders it as markdown."""

    rows: list[dict]
    meta: dict

    def to_json(self) -> str:
        return json.dumps({"rows": self.rows, "meta": self.meta}, indent=2, default=str)


def _kmeans_restarts(x: torch.Tensor, k: int, seed: int, restarts: int = 5) -> torch.Tensor:
    best, best_inertia = None, math.inf
    for r in range(restarts):
        assign, cent = kmeans(x, k, seed=seed + r)
        inertia = float(((x - cent[assign]) ** 2).sum())
        if inertia < best_inertia - 1e-9:
            best, best_inertia = assign, inertia
    assert best is not None
    return best


def _dataset_scores(acc: _Acc, num_classes: int, seed: int) -> dict:
    if not acc.embeds:
        return {"miou": float("nan"), "acc": float("nan")}
    emb = torch.cat(acc.embeds).float()
    k = min(num_classes, emb.shape[0])
    assign = _kmeans_restarts(emb, k, seed).numpy()
    total = np.zeros((num_classes, max(num_classes, k)), dtype=np.int64)
    start = 0
    for hist in acc.hists:
        s = hist.shape[1]
        ids = assign[start:start + s]
        start += s
        np.add.at(total.T, ids, hist.T)  # column j of hist goes to cluster ids[j]
    scorer = SegmentationScorer(num_classes, "dataset")
    scorer.hist = total
    scorer.pixels = int(total.sum())
    scorer.images = len(acc.hists)
    return scorer.compute()


def _row(method: str, acc: _Acc, num_classes: int, seed: int, images: int) -> dict:
    """One method's line of the table: both protocols, segments and seconds per image."""
    per = acc.per_image.compute()
    ds = _dataset_scores(acc, num_classes, seed)
    return {
        "method": method, "description": METHODS[method].description,
        "instance_miou": float(np.mean(acc.instance)) if acc.instance else None,
        "per_image_miou": per["miou"], "per_image_acc": per["acc"],
        "dataset_miou": ds["miou"], "dataset_acc": ds["acc"],
        "segments": float(np.mean(acc.segments)), "seconds": acc.seconds / images,
    }


class ImageRecords:
    """Per-image results of an evaluation, one safetensors file per image in ``folder``
    (``<sample name>.safetensors``: each method's label map and segment embeddings, and its
    seconds and the run key as metadata), written atomically once every method of the image is
    done. A rerun with the same run key replays them instead of recomputing, and the table is
    always computed from these per-image results, so a resumed run prints the same table as an
    uninterrupted one (the seconds are the recorded ones)."""

    def __init__(self, folder: str | Path, run_key: str) -> None:
        self.folder, self.run_key = Path(folder), run_key
        self.folder.mkdir(parents=True, exist_ok=True)
        self.replayed = 0

    def _path(self, name: str) -> Path:
        return self.folder / (name.replace("/", "__").replace(os.sep, "__") + ".safetensors")

    def has(self, name: str, methods: Sequence[str]) -> bool:
        """Whether the image ``name`` has a record of every method under this run key (reads the
        file's header only)."""
        from safetensors import safe_open

        path = self._path(name)
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except Exception:  # a torn or foreign file: the image is done again
            return False
        seconds = json.loads(meta.get("seconds", "{}")) if meta.get("run_key") == self.run_key else {}
        return all(m in seconds for m in methods)

    def load(self, sample: Sample, methods: Sequence[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]] | None:
        """``{method: (labels, embeddings, seconds)}`` when every method is recorded under this run key."""
        from safetensors import safe_open

        path = self._path(sample.name)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                if meta.get("run_key") != self.run_key:
                    return None
                seconds = json.loads(meta.get("seconds", "{}"))
                if not all(m in seconds for m in methods):
                    return None
                out = {m: (f.get_tensor(f"{m}/labels").long(), f.get_tensor(f"{m}/embeddings"), float(seconds[m]))
                       for m in methods}
        except Exception:  # a torn or foreign file: recompute the image
            return None
        self.replayed += 1
        return out

    def save(self, sample: Sample, results: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        from safetensors.torch import save_file

        tensors = {}
        for m, (labels, emb, _) in results.items():
            tensors[f"{m}/labels"] = labels.to(torch.int32).contiguous()
            tensors[f"{m}/embeddings"] = emb.contiguous()
        meta = {"run_key": self.run_key, "seconds": json.dumps({m: r[2] for m, r in results.items()})}
        path = self._path(sample.name)
        tmp = path.with_name(path.name + ".partial")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)


def evaluate(dataset: Iterable[Sample], methods: Sequence[str], backend: Backend | None = None, *,
             num_classes: int, settings: DiffSegSettings | None = None,
             emerdiff: EmerDiffSettings | None = None, size: int | None = None, seed: int = 0,
             progress: Progress | None = None, total: int | None = None,
             on_image: Callable[[Sample, dict[str, torch.Tensor]], None] | None = None,
             records: ImageRecords | None = None) -> Evaluation:
    """Score ``methods`` on ``dataset``.

    Args:
        dataset: :class:`Sample` s (e.g. :class:`SyntheticDataset`, :class:`CocoStuff27Dataset`).
        methods: names from :data:`METHODS`.
        backend: the model (needed unless only colour/one-segment baselines are asked for).
        num_classes: ground-truth classes (16 region fills for synthetic, 27 for COCO/Cityscapes).
        settings: DiffSeg settings (default :func:`diffseg_settings` of the backend).
        emerdiff: EmerDiff settings (default: the model's, ``EmerDiffSettings.for_model``).
        size: model input side (default :func:`model_size`).
        seed: seeds k-means (colour baseline, dataset-level clustering) and the random weights.
        progress: advanced once per (image, method).
        total: number of images (for the progress total), default ``len(dataset)``.
        on_image: called with each sample and its labels per method (at the evaluation size).
        records: per-image results to replay and to write (resumable runs); ``None`` = neither.

    Returns:
        :class:`Evaluation` with, per method: ``instance_miou`` (synthetic only), ``per_image``
        and ``dataset`` scorer summaries (miou, acc), ``segments`` (mean per image), ``seconds``
        (mean per image, shared work counted for every method that needs it).
    """
    methods = parse_methods(methods)
    needs_model = any(METHODS[m].embedding != "colour" for m in methods)
    if needs_model and backend is None:
        raise EmergentSegError("these methods need a model; pass a backend")
    size = size or (model_size(backend) if backend is not None else EVAL_SIZE)
    if settings is None and backend is not None:
        settings = diffseg_settings(backend)
    runner = _Runner(backend, size, settings, emerdiff, "random" in methods, seed)
    accs = {m: _Acc(SegmentationScorer(num_classes, "per_image")) for m in methods}
    progress = progress or Progress()
    n_total = total if total is not None else (len(dataset) if hasattr(dataset, "__len__") else 0)  # type: ignore[arg-type]
    progress.grow(n_total * len(methods))
    images = 0
    for sample in dataset:
        recorded = records.load(sample, methods) if records is not None else None
        results = recorded or {}
        run = None if recorded else _ImageRun(runner, sample)
        produced: dict[str, torch.Tensor] = {}
        for m in methods:
            progress.check()
            if run is not None:
                labels = _compact(_resize_labels(run.method(m), run.eval_hw))
                emb = run.embeddings(m, labels)  # protocol overhead, not counted in the method's time
                results[m] = (labels, emb, run.seconds(f"method:{m}"))
            labels, emb, elapsed = results[m]
            acc = accs[m]
            acc.seconds += elapsed
            acc.per_image.update(labels, sample.labels)
            hist = confusion(sample.labels, labels, num_classes, int(labels.max()) + 1)
            acc.hists.append(hist[:, : int(labels.max()) + 1])
            acc.embeds.append(emb)
            acc.segments.append(int(labels.max()) + 1)
            if sample.instances is not None:
                acc.instance.append(instance_scores(labels, sample.instances)["miou"])
            produced[m] = labels
            progress.advance()
        if records is not None and recorded is None:
            records.save(sample, results)
        if on_image is not None:
            on_image(sample, produced)
        images += 1
    if images == 0:
        raise EmergentSegError("the dataset has no images")
    rows = [_row(m, accs[m], num_classes, seed, images) for m in methods]
    meta = {"images": images, "num_classes": num_classes, "model_size": size, "seed": seed,
            "settings": None if settings is None else {
                "timestep": settings.timestep, "tau": settings.tau, "tau_quantile": settings.tau_quantile,
                "iterations": settings.iterations, "anchors_per_side": settings.anchors_per_side},
            "emerdiff": {"k": runner.emerdiff.clusters, "steps": runner.emerdiff.label,
                         "sigma": runner.emerdiff.sigma, "lambda": runner.emerdiff.lam, "seed": seed}}
    return Evaluation(rows, meta)
