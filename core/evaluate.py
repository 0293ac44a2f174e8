"""Evaluation harness: ``python -m emergent_seg eval`` (and calibration of the shipped model).

Scores every method with Hungarian-matched mIoU and pixel accuracy (core/metrics.py) under the two
protocols below, reported in separate columns because they are never
comparable:

* **per-image** (DiffSeg's protocol, ``utils.hungarian_matching``): each image's predicted segments
  are matched to its ground-truth classes on their own; TP/FP/FN are accumulated over the dataset.
* **dataset** (the "traditional" PiCIE/STEGO protocol, EmerDiff Table 1): predicted segments need
  ids that mean the same thing in every image, so each method's segments get one. Exactly:

  1. every predicted segment of every image gets a *mask embedding*: the mean, over the segment's
     pixels, of a per-pixel feature. For methods that run the model (DiffSeg, EmerDiff, the
     mapper, the random-weights baseline) the feature is EmerDiff's low-res feature (the queries
     ``to_q(norm2(h))`` of the first cross-attention layer of the 16x16 decoder block, clean latent
     noised to t_f = 1 with seed 0, the same features EmerDiff clusters), L2-normalised per cell;
     each pixel takes the feature of the grid cell it falls in (cell ``(y*h//H, x*w//W)``), so the
     mean is area-weighted. Aggregated self-attention rows are *not* used: they are distributions
     over key positions of the same image and carry no identity across images. The random-weights
     baseline uses its own (random) model's features, colour k-means and one-segment use the mean
     RGB colour;
  2. k-means (seeded k-means++, 5 restarts, lowest inertia kept) with ``K = number of classes``
     over all segment embeddings of the dataset, one point per segment (not weighted by area);
  3. each pixel takes its segment's cluster id, and ONE Hungarian matching over the dataset's
     accumulated ``classes x K`` confusion gives TP/FP/FN (``SegmentationScorer(protocol=
     "dataset")`` on the accumulated histogram, computed from per-image class x segment counts).

  This follows EmerDiff's traditional protocol as far as it goes without a trained linear probe.

On the **synthetic** scenes (fixture/scenes.py) the ground truth is per-image instances; their
textures give semantic classes (9, one texture per region, distinct within a scene), used for the
two protocols above. The headline synthetic number is the **instance mIoU**
(``metrics.score_instances``: each image matched on its own against its instance ids, mean over
images), which is what the quality thresholds in tests/test_quality.py refer to.

Datasets (``--data ROOT``):

* ``coco-stuff-27``: COCO val2017 images + stuffthingmaps (fine ids 0..181, 255 = unlabelled),
  restricted to the curated list ``Coco164kFull_Stuff_Coarse_7.txt`` (2,175 images); fine ids are
  mapped to 27 coarse classes with :data:`COCO_FINE_TO_COARSE` (the IIC/PiCIE/STEGO table; no
  pickle is read); 255 -> ignore.
* ``cityscapes``: ``leftImg8bit/val`` + ``gtFine/val *_gtFine_labelIds.png`` (500 images); ids 0-6
  (and anything outside 7..33) -> ignore, 7..33 -> 0..26.

Both are centre-cropped to a square of side min(H, W) and resized to 512 (images bilinear without
antialiasing as ``tf.image.resize``; labels nearest with half-pixel centres, ``nearest-exact``, as
``tf.image.resize(NEAREST_NEIGHBOR)``). A model whose native size is not 512 (the shipped 32 px
model) segments the image resized to its native size (bilinear, antialiased) and its labels are
resized back to 512 (nearest) for scoring.

Methods (``--methods``, comma separated):

=================  ==========================================================================
diffseg-fast       DiffSeg, matmul-form merge (the CLI default), calibrated settings
diffseg-parity     DiffSeg, the official float16 arithmetic
diffseg-refine     DiffSeg fast + the official k-means refinement
emerdiff           EmerDiff: low-res k-means (K = ``--clusters`` or the calibrated K) + mapper
emerdiff-lowres    the same low-res k-means masks, nearest-upsampled (the mapper's naive baseline)
emerdiff-lowres-bilinear  the same masks, bilinear-upsampled (one-hot, then argmax; the paper's baseline)
diffseg+mapper     DiffSeg fast, pooled to the mapper's grid (majority vote), then the mapper
diffseg-pooled     that pooled grid nearest-upsampled (the naive baseline of diffseg+mapper)
diffseg-pooled-bilinear  that pooled grid bilinear-upsampled
random             DiffSeg fast on a UNet of the same architecture with random weights (seed 0)
color-kmeans       k-means on RGB pixels with the true K (classes/instances present in the image)
one-segment        the whole image as one segment
=================  ==========================================================================
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .backend import Backend, Progress
from .errors import EmergentSegError
from .kmeans import kmeans
from .metrics import SegmentationScorer, confusion, instance_scores
from .pipeline import DiffSegSettings

__all__ = [
    "Sample", "SyntheticDataset", "CocoStuff27Dataset", "CityscapesDataset", "open_dataset",
    "COCO_FINE_TO_COARSE", "COCO_COARSE_NAMES", "CITYSCAPES_NAMES", "coco_fine_to_coarse",
    "cityscapes_to_27", "centre_crop_resize", "METHODS", "DEFAULT_METHODS", "parse_methods",
    "model_size", "diffseg_settings", "random_backend", "Evaluation", "evaluate", "format_table",
    "run_eval", "calibrate", "calibrate_mapper", "write_calibration", "CALIBRATION_SEED", "main",
]

EVAL_SIZE = 512  # DiffSeg's preprocessing for COCO-Stuff-27 and Cityscapes
#: First seed of the calibration scenes: inside the training range (below ``EVAL_SEED``), far
#: from the seeds the training script draws (``seed * 1e8 + step * batch + i``, small for seed 0).
CALIBRATION_SEED = 500_000_000

# ---------------------------------------------------------------------------------------------
# Label tables
# ---------------------------------------------------------------------------------------------

#: COCO-Stuff fine id (0..181, as stored in the stuffthingmaps PNGs) -> 27 coarse classes; the
#: table of IIC/PiCIE/STEGO (``fine_to_coarse_dict.pickle`` in google/diffseg), written out here
#: so no pickle is ever read. Coarse 0..11 are "things", 12..26 "stuff" (:data:`COCO_COARSE_NAMES`).
COCO_FINE_TO_COARSE: tuple[int, ...] = (
    9, 11, 11, 11, 11, 11, 11, 11, 11, 8, 8, 8, 8, 8, 8, 7, 7, 7, 7, 7,          # 0-19
    7, 7, 7, 7, 7, 6, 6, 6, 6, 6, 6, 6, 6, 10, 10, 10, 10, 10, 10, 10,          # 20-39
    10, 10, 10, 5, 5, 5, 5, 5, 5, 5, 5, 2, 2, 2, 2, 2, 2, 2, 2, 2,               # 40-59
    2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 0, 0, 0, 0, 0, 0, 1, 1, 1,                 # 60-79
    1, 1, 1, 4, 4, 4, 4, 4, 4, 4, 4, 17, 17, 22, 20, 20, 22, 15, 25, 16,       # 80-99
    13, 12, 12, 17, 17, 23, 15, 15, 17, 15, 21, 15, 25, 13, 13, 13, 13, 13, 22, 26,  # 100-119
    14, 14, 15, 22, 21, 21, 24, 20, 22, 15, 17, 16, 15, 22, 24, 21, 17, 25, 16, 21,  # 120-139
    17, 22, 16, 21, 21, 25, 21, 26, 21, 24, 20, 17, 14, 21, 26, 15, 23, 20, 21, 24,  # 140-159
    15, 24, 22, 25, 15, 20, 17, 17, 22, 14, 18, 18, 18, 18, 18, 18, 18, 26, 26, 19,  # 160-179
    19, 24,                                                                       # 180-181
)
COCO_COARSE_NAMES: tuple[str, ...] = (
    "electronic", "appliance", "food-things", "furniture-things", "indoor", "kitchen", "accessory",
    "animal", "outdoor", "person", "sports", "vehicle", "ceiling", "floor", "food-stuff",
    "furniture-stuff", "raw-material", "textile", "wall", "window", "building", "ground", "plant",
    "sky", "solid", "structural", "water")
#: Cityscapes label ids 7..33 in order (PiCIE's 27 classes).
CITYSCAPES_NAMES: tuple[str, ...] = (
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge",
    "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky",
    "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle")
COCO_LIST = "Coco164kFull_Stuff_Coarse_7.txt"


def coco_fine_to_coarse(fine: torch.Tensor) -> torch.Tensor:
    """Map a stuffthingmap (fine ids 0..181, 255 unlabelled) to coarse ids 0..26, -1 = ignore."""
    lut = torch.full((256,), -1, dtype=torch.int64)
    lut[: len(COCO_FINE_TO_COARSE)] = torch.tensor(COCO_FINE_TO_COARSE, dtype=torch.int64)
    fine = fine.to(torch.int64)
    out = torch.full_like(fine, -1)
    ok = (fine >= 0) & (fine < 256)
    out[ok] = lut[fine[ok]]
    return out


def cityscapes_to_27(label_ids: torch.Tensor) -> torch.Tensor:
    """Cityscapes ``labelIds`` -> 0..26 (ids 7..33), everything else (0..6, -1, >33) -> -1."""
    ids = label_ids.to(torch.int64)
    return torch.where((ids >= 7) & (ids <= 33), ids - 7, torch.full_like(ids, -1))


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    """One evaluation image.

    Attributes:
        name: identifier (file stem or ``scene<seed>``).
        image: ``[3, H, W]`` float32 in [0, 1] at the evaluation size.
        labels: ``[H, W]`` int64 semantic class ids, -1 = ignore.
        instances: ``[H, W]`` int64 instance ids (synthetic scenes only), else ``None``.
        caption: text for reports.
    """

    name: str
    image: torch.Tensor
    labels: torch.Tensor
    instances: torch.Tensor | None = None
    caption: str = ""

    @property
    def true_k(self) -> int:
        """Regions present: instances when known, else labelled classes present."""
        ref = self.instances if self.instances is not None else self.labels
        ids = torch.unique(ref)
        return max(1, int((ids >= 0).sum()))


def centre_crop_resize(image: torch.Tensor, labels: torch.Tensor | None, size: int
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DiffSeg's ``process_image``: centre square crop of side ``min(H, W)`` (start ``(H-c)//2``),
    image resized bilinear (half-pixel centres, no antialias), labels nearest (``nearest-exact``)."""
    h, w = image.shape[-2:]
    c = min(h, w)
    top, left = (h - c) // 2, (w - c) // 2
    img = image[..., top:top + c, left:left + c]
    if c != size:
        img = F.interpolate(img.unsqueeze(0).float(), size=(size, size), mode="bilinear",
                            align_corners=False, antialias=False)[0]
    lab = None
    if labels is not None:
        if tuple(labels.shape[-2:]) != (h, w):
            raise EmergentSegError(f"label map {tuple(labels.shape[-2:])} does not match its image {(h, w)}")
        lab = labels[..., top:top + c, left:left + c]
        if c != size:
            lab = F.interpolate(lab[None, None].float(), size=(size, size), mode="nearest-exact")[0, 0]
        lab = lab.round().to(torch.int64)
    return img.clamp(0, 1).contiguous(), lab


def _read_rgb(path: Path) -> torch.Tensor:
    from .images import read_image
    return read_image(path)


def _read_label(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as img:
        arr = np.asarray(img)
    if arr.ndim == 3:  # some copies store the ids in all three channels
        arr = arr[..., 0]
    return torch.from_numpy(arr.astype(np.int64))


class SyntheticDataset:
    """Held-out synthetic scenes ``make_scenes(n, seed, size)`` (seed defaults to ``EVAL_SEED``).

    Classes are the 16 region fills (``fixture.scenes.TEXTURE_NAMES``); instances are the scene's
    region ids."""

    name = "synthetic"

    def __init__(self, n: int, seed: int | None = None, size: int = 32) -> None:
        from ..fixture.scenes import EVAL_SEED, TEXTURE_NAMES

        if n < 1:
            raise EmergentSegError(f"--scenes must be >= 1, got {n}")
        self.n, self.seed, self.size = int(n), int(EVAL_SEED if seed is None else seed), int(size)
        self.class_names = tuple(TEXTURE_NAMES)
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return self.n

    def describe(self) -> str:
        return f"synthetic scenes, seeds {self.seed}..{self.seed + self.n - 1}, {self.size} px"

    def __iter__(self) -> Iterator[Sample]:
        from ..fixture.scenes import TEXTURE_NAMES, make_scene

        for i in range(self.n):
            scene = make_scene(self.seed + i, self.size)
            lut = torch.tensor([TEXTURE_NAMES.index(t) for t in scene.textures], dtype=torch.int64)
            yield Sample(f"scene{scene.seed}", scene.image, lut[scene.labels], scene.labels, scene.caption)


def _first_existing(root: Path, candidates: Sequence[str]) -> Path | None:
    for rel in candidates:
        p = root / rel
        if p.exists():
            return p
    return None


class _LabelledFiles:
    """What the file datasets share: ``items`` = ``(name, image path, label path)``, each pair
    centre-cropped and resized to ``size``, then ``to_classes`` maps the stored label ids to the
    benchmark's 27 classes."""

    num_classes = 27
    class_names: tuple[str, ...]
    items: list[tuple[str, Path, Path]]
    size: int

    @staticmethod
    def to_classes(labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Sample]:
        for name, img_path, lab_path in self.items:
            image, labels = centre_crop_resize(_read_rgb(img_path), _read_label(lab_path), self.size)
            assert labels is not None
            yield Sample(name, image, self.to_classes(labels))


class CocoStuff27Dataset(_LabelledFiles):
    """COCO-Stuff-27, curated val2017 subset (2,175 images), as in google/diffseg.

    Accepted layouts under ``root`` (first match wins)::

        curated list : Coco164kFull_Stuff_Coarse_7.txt | curated/val2017/Coco164kFull_Stuff_Coarse_7.txt
        images       : val2017/<id>.jpg | images/val2017/<id>.jpg
        labels       : annotation_val2017/<id>.png | annotations/val2017/<id>.png
                       | stuffthingmaps_trainval2017/val2017/<id>.png
    """

    name = "coco-stuff-27"
    class_names = COCO_COARSE_NAMES
    to_classes = staticmethod(coco_fine_to_coarse)
    LAYOUT = ("expected under {root}: the curated list Coco164kFull_Stuff_Coarse_7.txt (google/diffseg "
              "data/coco/, or curated/val2017/), COCO val2017 images in val2017/ or images/val2017/ "
              "(<id>.jpg) and the stuffthingmaps in annotation_val2017/, annotations/val2017/ or "
              "stuffthingmaps_trainval2017/val2017/ (<id>.png)")

    def __init__(self, root: str | Path, size: int = EVAL_SIZE, limit: int | None = None) -> None:
        self.root = Path(root).expanduser()
        layout = self.LAYOUT.format(root=self.root)
        if not self.root.is_dir():
            raise EmergentSegError(f"COCO-Stuff root {self.root} is not a folder; {layout}")
        listing = _first_existing(self.root, (COCO_LIST, f"curated/val2017/{COCO_LIST}", f"curated/{COCO_LIST}"))
        images = _first_existing(self.root, ("val2017", "images/val2017"))
        labels = _first_existing(self.root, ("annotation_val2017", "annotations/val2017",
                                             "stuffthingmaps_trainval2017/val2017",
                                             "annotations/stuffthingmaps_trainval2017/val2017"))
        missing = [what for what, p in (("the curated list", listing), ("the images folder", images),
                                        ("the label folder", labels)) if p is None]
        if missing:
            raise EmergentSegError(f"COCO-Stuff-27: {', '.join(missing)} not found; {layout}")
        ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        if not ids:
            raise EmergentSegError(f"{listing} lists no image ids; {layout}")
        if limit is not None:
            ids = ids[: max(0, int(limit))]
        self.items = [(i, images / f"{i}.jpg", labels / f"{i}.png") for i in ids]
        absent = [str(p) for _, a, b in self.items for p in (a, b) if not p.exists()]
        if absent:
            raise EmergentSegError(f"COCO-Stuff-27: {len(absent)} listed files are missing (first: "
                                   f"{absent[0]}); {layout}")
        self.size = int(size)

    def describe(self) -> str:
        return f"COCO-Stuff-27 curated val2017 ({len(self)} images), centre crop + resize {self.size}"


class CityscapesDataset(_LabelledFiles):
    """Cityscapes val (500 images), 27 classes (PiCIE protocol), as in google/diffseg.

    Layout under ``root``: ``leftImg8bit/val/<city>/<name>_leftImg8bit.png`` and
    ``gtFine/val/<city>/<name>_gtFine_labelIds.png``."""

    name = "cityscapes"
    class_names = CITYSCAPES_NAMES
    to_classes = staticmethod(cityscapes_to_27)
    LAYOUT = ("expected under {root}: leftImg8bit/val/<city>/<name>_leftImg8bit.png and "
              "gtFine/val/<city>/<name>_gtFine_labelIds.png (the official leftImg8bit_trainvaltest "
              "and gtFine_trainvaltest archives unpacked there)")

    def __init__(self, root: str | Path, size: int = EVAL_SIZE, limit: int | None = None) -> None:
        self.root = Path(root).expanduser()
        layout = self.LAYOUT.format(root=self.root)
        img_dir, gt_dir = self.root / "leftImg8bit" / "val", self.root / "gtFine" / "val"
        for d in (img_dir, gt_dir):
            if not d.is_dir():
                raise EmergentSegError(f"Cityscapes: {d} not found; {layout}")
        images = sorted(img_dir.glob("*/*_leftImg8bit.png"))
        if not images:
            raise EmergentSegError(f"Cityscapes: no *_leftImg8bit.png under {img_dir}; {layout}")
        if limit is not None:
            images = images[: max(0, int(limit))]
        self.items = []
        for p in images:
            stem = p.name[: -len("_leftImg8bit.png")]
            gt = gt_dir / p.parent.name / f"{stem}_gtFine_labelIds.png"
            if not gt.exists():
                raise EmergentSegError(f"Cityscapes: {gt} is missing for {p.name}; {layout}")
            self.items.append((stem, p, gt))
        self.size = int(size)

    def describe(self) -> str:
        return f"Cityscapes val ({len(self)} images), 27 classes, centre crop + resize {self.size}"


def open_dataset(name: str, data: str | None = None, scenes: int = 200, limit: int | None = None,
                 size: int | None = None, seed: int | None = None):
    """``synthetic`` (``scenes`` held-out scenes at ``size``, default 32) | ``coco-stuff-27`` |
    ``cityscapes`` (need ``data``)."""
    key = name.lower().replace("_", "-")
    if key == "synthetic":
        n = scenes if limit is None else min(scenes, limit)
        return SyntheticDataset(n, seed, size or 32)
    aliases = {"coco": "coco-stuff-27", "coco-stuff": "coco-stuff-27", "cocostuff27": "coco-stuff-27",
               "coco-stuff-27": "coco-stuff-27", "cityscapes": "cityscapes"}
    if key not in aliases:
        raise EmergentSegError(f"unknown dataset {name!r}; use synthetic, coco-stuff-27 or cityscapes")
    if not data:
        raise EmergentSegError(f"--dataset {aliases[key]} needs --data PATH to the dataset root")
    cls = CocoStuff27Dataset if aliases[key] == "coco-stuff-27" else CityscapesDataset
    return cls(data, size or EVAL_SIZE, limit)


# ---------------------------------------------------------------------------------------------
# Model helpers
# ---------------------------------------------------------------------------------------------

def model_size(backend: Backend) -> int:
    """Native square input side (``core.images.native_side``: the embedded model's 256, SD1.x 512)."""
    from .images import native_side

    return native_side(backend)


def diffseg_settings(backend: Backend, tau: float | None = None, tau_quantile: float | None = None,
                     mode: str = "fast", refine: bool = False, timestep: int | None = None,
                     dataset: str = "synthetic") -> DiffSegSettings:
    """The settings a run uses: explicit ``tau``/``tau_quantile``, else the model's stored
    calibration (the fixture), else the paper's tau (1.1 COCO, 0.9 Cityscapes)."""
    from .defaults import diffseg_threshold, diffseg_timestep

    if tau is None and tau_quantile is None:
        tau, tau_quantile = diffseg_threshold(backend, dataset)
    t = int(timestep if timestep is not None else diffseg_timestep(backend))
    return DiffSegSettings(timestep=t, tau=tau, tau_quantile=tau_quantile, mode=mode, refine=refine)


def random_backend(backend: Backend, seed: int = 0) -> Backend:
    """The same UNet architecture with freshly initialised (seeded) weights; VAE, text encoder,
    schedule and calibration are shared with ``backend``."""
    from .backends.diffusers import DiffusersBackend

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
    out.calibration = getattr(backend, "calibration", {})  # type: ignore[attr-defined]
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


@dataclass
class EmerDiffOptions:
    """EmerDiff settings of a run. ``steps``: a mapper quality preset (fast | faithful |
    fast-symmetric, see ``core.emerdiff.QUALITY_PRESETS``) or a number of steps; ``None`` = the
    model's stored default, else fast. ``sigma=None``: the model's stored value, else the
    library's 4 px at 512 px scaled to the model size."""

    clusters: int | None = None
    steps: str | int | None = None
    sigma: float | None = None
    lam: float = 10.0
    seed: int = 0


def mapper_steps(steps: str | int) -> dict:
    """Mapper keyword arguments for a quality preset name (``core.emerdiff.QUALITY_PRESETS``:
    fast | faithful | fast-symmetric) or an explicit number of denoising steps (symmetric)."""
    from . import emerdiff

    if isinstance(steps, str) and not steps.isdigit():
        if steps == "paper":
            steps = "faithful"
        return emerdiff.preset(steps)
    return {"steps": int(steps), "difference": "symmetric"}


class _ImageRun:
    """Per-image cache so shared work (latents, features, DiffSeg, low-res k-means) runs once.

    Every cached piece records its *exclusive* time (its wall time minus that of the pieces first
    computed inside it) and the pieces it used, so a method's time is the sum over everything it
    needed, whichever method happened to compute a shared piece first."""

    def __init__(self, ev: "_Runner", sample: Sample) -> None:
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
        from .emerdiff import extract_features

        def run() -> tuple[torch.Tensor, tuple[int, int]]:
            f = extract_features(backend, self.latents(backend), seed=0)
            feats = F.normalize(f.features[0].float(), dim=-1).cpu()
            return feats, f.grid
        return self.get(f"features:{id(backend)}", run)

    def diffseg(self, backend: Backend, settings: DiffSegSettings, key: str) -> torch.Tensor:
        from .pipeline import segment_diffseg

        return self.get(key, lambda: segment_diffseg(backend, self.model_image.to(
            getattr(backend, "device", "cpu")), settings=settings).labels[0].cpu())

    def lowres(self) -> Any:
        from .emerdiff import lowres_kmeans

        ev = self.ev
        return self.get("emerdiff-lowres", lambda: lowres_kmeans(
            ev.backend, self.latents(ev.backend), k=ev.emerdiff_k, seed=ev.emerdiff.seed))

    def mapper(self, grid_labels: torch.Tensor) -> torch.Tensor:
        from .emerdiff import modulated_denoise_mapper

        ev = self.ev
        seg = modulated_denoise_mapper(ev.backend, self.latents(ev.backend), grid_labels,
                                       lam=ev.emerdiff.lam, sigma=ev.sigma, seed=ev.emerdiff.seed,
                                       **mapper_steps(ev.emerdiff.steps))
        return seg.labels[0].cpu()

    def pooled(self) -> torch.Tensor:
        from .emerdiff import choose_site, pool_labels

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
        from .emerdiff import upsample_labels

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


@dataclass
class _Acc:
    """Accumulated scores of one method."""

    per_image: SegmentationScorer
    hists: list[np.ndarray] = field(default_factory=list)
    embeds: list[torch.Tensor] = field(default_factory=list)
    instance: list[float] = field(default_factory=list)
    segments: list[int] = field(default_factory=list)
    seconds: float = 0.0


class _Runner:
    def __init__(self, backend: Backend | None, size: int, settings: DiffSegSettings | None,
                 emerdiff: EmerDiffOptions, needs_model: bool, needs_random: bool, seed: int) -> None:
        self.backend = backend
        self.size = size
        self.settings = settings or DiffSegSettings()
        self.emerdiff = emerdiff
        self.seed = seed
        self.random = random_backend(backend, seed) if needs_random and backend is not None else None
        from .defaults import emerdiff_defaults
        defaults = emerdiff_defaults(backend, size)
        self.emerdiff_k = int(emerdiff.clusters or defaults.clusters)
        self.sigma = float(emerdiff.sigma if emerdiff.sigma is not None else defaults.sigma)
        if emerdiff.steps is None:
            self.emerdiff = replace(emerdiff, steps=defaults.quality)


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


def evaluate(dataset: Iterable[Sample], methods: Sequence[str], backend: Backend | None = None, *,
             num_classes: int, settings: DiffSegSettings | None = None,
             emerdiff: EmerDiffOptions | None = None, size: int | None = None, seed: int = 0,
             progress: Progress | None = None, total: int | None = None,
             on_image: Callable[[Sample, dict[str, torch.Tensor]], None] | None = None) -> Evaluation:
    """Score ``methods`` on ``dataset``.

    Args:
        dataset: :class:`Sample` s (e.g. :class:`SyntheticDataset`, :class:`CocoStuff27Dataset`).
        methods: names from :data:`METHODS`.
        backend: the model (needed unless only colour/one-segment baselines are asked for).
        num_classes: ground-truth classes (16 region fills for synthetic, 27 for COCO/Cityscapes).
        settings: DiffSeg settings (default :func:`diffseg_settings` of the backend).
        emerdiff: EmerDiff options (K, steps, sigma, lambda, seed).
        size: model input side (default :func:`model_size`).
        seed: seeds k-means (colour baseline, dataset-level clustering) and the random weights.
        progress: advanced once per (image, method).
        total: number of images (for the progress total), default ``len(dataset)``.
        on_image: called with each sample and its labels per method (at the evaluation size).

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
    runner = _Runner(backend, size, settings, emerdiff or EmerDiffOptions(), needs_model,
                     "random" in methods, seed)
    accs = {m: _Acc(SegmentationScorer(num_classes, "per_image")) for m in methods}
    progress = progress or Progress()
    n_total = total if total is not None else (len(dataset) if hasattr(dataset, "__len__") else 0)  # type: ignore[arg-type]
    progress.grow(n_total * len(methods))
    images = 0
    for sample in dataset:
        run = _ImageRun(runner, sample)
        produced: dict[str, torch.Tensor] = {}
        for m in methods:
            progress.check()
            raw = run.method(m)
            labels = _compact(_resize_labels(raw, run.eval_hw))
            emb = run.embeddings(m, labels)  # protocol overhead, not counted in the method's time
            elapsed = run.seconds(f"method:{m}")
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
        if on_image is not None:
            on_image(sample, produced)
        images += 1
    if images == 0:
        raise EmergentSegError("the dataset has no images")
    rows = []
    for m in methods:
        acc = accs[m]
        per = acc.per_image.compute()
        ds = _dataset_scores(acc, num_classes, seed)
        rows.append({
            "method": m, "description": METHODS[m].description,
            "instance_miou": float(np.mean(acc.instance)) if acc.instance else None,
            "per_image_miou": per["miou"], "per_image_acc": per["acc"],
            "dataset_miou": ds["miou"], "dataset_acc": ds["acc"],
            "segments": float(np.mean(acc.segments)), "seconds": acc.seconds / images,
        })
    meta = {"images": images, "num_classes": num_classes, "model_size": size, "seed": seed,
            "settings": None if settings is None else {
                "timestep": settings.timestep, "tau": settings.tau, "tau_quantile": settings.tau_quantile,
                "iterations": settings.iterations, "anchors_per_side": settings.anchors_per_side},
            "emerdiff": {"k": runner.emerdiff_k, "steps": runner.emerdiff.steps, "sigma": runner.sigma,
                         "lambda": runner.emerdiff.lam, "seed": runner.emerdiff.seed}}
    return Evaluation(rows, meta)


def _pct(x: float | None) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:.1f}"


def format_table(ev: Evaluation, title: str = "") -> str:
    """Markdown table (percentages) with the protocol notes under it."""
    synthetic = any(r["instance_miou"] is not None for r in ev.rows)
    head = ["method"] + (["instance mIoU"] if synthetic else []) + [
        "per-image mIoU", "per-image ACC", "dataset mIoU", "dataset ACC", "segments/img", "s/img"]
    lines = []
    if title:
        lines += [f"### {title}", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in ev.rows:
        cells = [r["method"]] + ([_pct(r["instance_miou"])] if synthetic else []) + [
            _pct(r["per_image_miou"]), _pct(r["per_image_acc"]), _pct(r["dataset_miou"]),
            _pct(r["dataset_acc"]), f"{r['segments']:.1f}", f"{r['seconds']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    m = ev.meta
    notes = [f"{m['images']} images, {m['num_classes']} classes, model input {m['model_size']} px."]
    s = m.get("settings")
    if s:
        thr = f"tau_quantile={s['tau_quantile']:g}" if s.get("tau_quantile") is not None else f"tau={s['tau']:g}"
        notes.append(f"DiffSeg: t={s['timestep']}, {thr}, N={s['iterations']}, "
                     f"{s['anchors_per_side']}x{s['anchors_per_side']} anchors.")
    e = m.get("emerdiff")
    if e and any(r["method"] in ("emerdiff", "emerdiff-lowres", "emerdiff-lowres-bilinear", "diffseg+mapper")
                 for r in ev.rows):
        notes.append(f"EmerDiff: K={e['k']}, mapper={e['steps']}, lambda={e['lambda']:g}, "
                     f"sigma={e['sigma']:.2f} px.")
    lines += ["", " ".join(notes), "",
              "Per-image = DiffSeg protocol (Hungarian per image, TP/FP/FN summed over the dataset). "
              "Dataset = traditional protocol: k-means (K = #classes) over per-segment mask embeddings "
              "(mean low-res UNet query feature inside the segment; mean RGB for the colour baselines), "
              "then one Hungarian over the dataset (see core/evaluate.py)."
              + (" Instance mIoU = mean over images of per-image matched IoU against the scene's "
                 "instances; classes for the two protocols are the 16 region fills (9 texture patterns, 7 photos)." if synthetic else "")
              + " The two protocols are not comparable with each other. s/img includes shared work "
              "(e.g. DiffSeg inside diffseg+mapper) for every method that uses it."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``eval`` options, shared by ``python -m emergent_seg eval`` and this module's ``main``."""
    parser.add_argument("--dataset", default="synthetic", help="synthetic | coco-stuff-27 | cityscapes")
    parser.add_argument("--data", help="dataset root for COCO-Stuff / Cityscapes")
    parser.add_argument("--model", help="model (default: the embedded tiny model)")
    parser.add_argument("--scenes", type=int, default=200, help="number of synthetic held-out scenes (default 200)")
    parser.add_argument("--scene-seed", type=int, default=None,
                        help="first synthetic scene seed (default: the held-out range, 1e9)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma-separated methods: " + ", ".join(METHODS))
    parser.add_argument("--out", default=None, help="write the table as markdown here")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N images of a dataset")
    parser.add_argument("--tau", type=float, default=None, help="DiffSeg KL threshold (default: calibrated / 1.1)")
    parser.add_argument("--tau-quantile", type=float, default=None,
                        help="adaptive DiffSeg threshold instead of --tau")
    parser.add_argument("--timestep", type=int, default=None, help="DiffSeg timestep (default: calibrated / 300)")
    parser.add_argument("--clusters", type=int, default=None, help="EmerDiff K (default: calibrated / 20)")
    parser.add_argument("--steps", default=None,
                        help="mapper quality: fast | faithful | fast-symmetric, or a number of denoising steps "
                             "(default: the model's stored default, else fast)")
    parser.add_argument("--sigma", type=float, default=None,
                        help="mapper smoothing in model pixels (default: 4 px at 512 px, scaled to the model size)")
    parser.add_argument("--size", type=int, default=None, help="model input side (default: native)")
    parser.add_argument("--seed", type=int, default=0, help="seed of k-means and the mapper's noise")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_eval(args: argparse.Namespace, bar: Any = None) -> Evaluation:
    """``python -m emergent_seg eval``: build the dataset and backend from ``args``, print the
    markdown table, write it to ``args.out`` (and the JSON next to it) when given."""
    methods = parse_methods(getattr(args, "methods", ",".join(DEFAULT_METHODS)))
    needs_model = any(METHODS[m].embedding != "colour" for m in methods)
    backend = None
    device = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    if needs_model:
        from .backends.loading import load_backend
        backend = load_backend(getattr(args, "model", None), device)
    size = getattr(args, "size", None)
    msize = int(size) if size else (model_size(backend) if backend is not None else 32)
    dataset = open_dataset(getattr(args, "dataset", "synthetic"), getattr(args, "data", None),
                           int(getattr(args, "scenes", 200) or 200), getattr(args, "limit", None),
                           size=msize if getattr(args, "dataset", "synthetic") == "synthetic" else None,
                           seed=getattr(args, "scene_seed", None))
    settings = None
    if backend is not None:
        settings = diffseg_settings(backend, getattr(args, "tau", None), getattr(args, "tau_quantile", None),
                                    timestep=getattr(args, "timestep", None), dataset=dataset.name)
    steps = getattr(args, "steps", None)
    steps = int(steps) if steps is not None and str(steps).isdigit() else steps
    opts = EmerDiffOptions(clusters=getattr(args, "clusters", None), steps=steps,
                           sigma=getattr(args, "sigma", None), seed=int(getattr(args, "seed", 0) or 0))
    progress = bar() if bar is not None else None
    ev = evaluate(dataset, methods, backend, num_classes=dataset.num_classes, settings=settings, emerdiff=opts,
                  size=msize, seed=int(getattr(args, "seed", 0) or 0), progress=progress)
    model_name = getattr(args, "model", None) or "embedded tiny model (fixture/weights)"
    ev.meta.update(dataset=dataset.describe(), model=str(model_name), methods=methods)
    title = f"{dataset.describe()} — {model_name}"
    table = format_table(ev, title)
    print(table)
    out = getattr(args, "out", None)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(table)
        path.with_suffix(".json").write_text(ev.to_json() + "\n")
        print(f"wrote {path} and {path.with_suffix('.json')}", file=sys.stderr)
    return ev


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
    from ..fixture.scenes import EVAL_SEED
    from .diffseg import kl_merge, threshold_from_quantile
    from .emerdiff import extract_features, kmeans_labels, upsample_labels
    from .pipeline import capture

    if not scenes:
        raise EmergentSegError("calibration needs at least one scene")
    bad = [s.seed for s in scenes if s.seed >= EVAL_SEED]
    if bad:
        raise EmergentSegError(f"calibration scenes must come from the training range (seed < {EVAL_SEED}); "
                               f"got seed {bad[0]}, which is held out for evaluation")
    progress = progress or Progress()
    progress.grow(len(scenes) * (len(timesteps) + (1 if emerdiff_ks else 0)))
    device = getattr(backend, "device", "cpu")
    scores: dict[tuple[int, str, float], list[float]] = {}
    segments: dict[tuple[int, str, float], list[int]] = {}
    for t in timesteps:
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

        def run(kind: str, value: float, t: int = int(t), caps: list = caps) -> float:
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
    mean = {k: float(np.mean(v)) for k, v in scores.items()}
    best = max(mean, key=lambda k: (mean[k], -list(mean).index(k)))
    t_best, kind, value = best
    result: dict[str, Any] = {kind: value, "timestep": t_best, "prompt": "",
                              "metric": "instance mIoU, mean over scenes (core/evaluate.py calibrate)",
                              "diffseg_score": round(mean[best], 4),
                              "diffseg_segments": round(float(np.mean(segments[best])), 2),
                              "true_segments": round(float(np.mean([s.num_instances + 1 for s in scenes])), 2)}
    result["candidates"] = {
        f"t{t}:{k}={v:g}": {"miou": round(m, 4), "segments": round(float(np.mean(segments[(t, k, v)])), 2)}
        for (t, k, v), m in mean.items()}
    if emerdiff_ks:
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
        result["emerdiff_k"] = k_best
        result["emerdiff_lowres_score"] = round(kmean[k_best], 4)
        result["emerdiff_k_candidates"] = {str(k): round(v, 4) for k, v in kmean.items()}
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
    from ..fixture.scenes import EVAL_SEED
    from . import emerdiff as E

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


def _run_calibrate(args: argparse.Namespace, bar: Any = None) -> dict:
    from ..fixture.scenes import make_scenes
    from .backends.loading import EMBEDDED_MODEL, load_backend

    directory = Path(args.weights or EMBEDDED_MODEL)
    backend = load_backend(directory)
    size = model_size(backend)
    scenes = make_scenes(args.scenes, seed=args.seed, size=size)
    timesteps = tuple(int(t) for t in str(args.timesteps).split(","))
    if args.mapper_only:
        if "emerdiff_k" not in backend.calibration:
            raise EmergentSegError("--mapper-only needs a stored emerdiff_k; run calibrate without it first")
        result = {}
    else:
        result = calibrate(backend, scenes, timesteps=timesteps, progress=bar() if bar else None)
    if args.mapper_scenes or args.mapper_only:
        k = int(result.get("emerdiff_k", backend.calibration.get("emerdiff_k", 20)))
        result.update(calibrate_mapper(backend, scenes[:args.mapper_scenes or len(scenes)], k,
                                       progress=bar() if bar else None))
    result["native_size"] = size
    summary = {k: v for k, v in result.items() if k not in ("candidates", "emerdiff_k_candidates",
                                                               "mapper_candidates")}
    print(json.dumps(summary, indent=2))
    if args.verbose:
        print(json.dumps({"candidates": result.get("candidates"),
                          "emerdiff_k_candidates": result.get("emerdiff_k_candidates"),
                          "mapper_candidates": result.get("mapper_candidates")}, indent=2))
    if args.write:
        path = write_calibration(directory, result)
        print(f"stored in {path} under \"calibration\"", file=sys.stderr)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m emergent_seg.core.evaluate {eval,calibrate} ...`` — ``eval`` is the CLI's eval
    with the EmerDiff/size/threshold options exposed; ``calibrate`` stores fixture defaults."""
    from ..cli import TerminalProgress
    from .errors import Interrupted

    parser = argparse.ArgumentParser(prog="python -m emergent_seg.core.evaluate", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_arguments(sub.add_parser("eval", help="score methods (same as python -m emergent_seg eval)"))
    cal = sub.add_parser("calibrate", help="pick the fixture's DiffSeg defaults on training-range scenes")
    cal.add_argument("--weights", help="model folder (default: the embedded model, fixture/weights)")
    cal.add_argument("--scenes", type=int, default=48, help="calibration scenes (default 48)")
    cal.add_argument("--seed", type=int, default=CALIBRATION_SEED, help="first scene seed (< EVAL_SEED)")
    cal.add_argument("--timesteps", default="300", help="comma-separated timesteps to try")
    cal.add_argument("--mapper-scenes", type=int, default=0,
                     help="also pick the mapper preset and sigma on the first N of the scenes (0 = skip)")
    cal.add_argument("--mapper-only", action="store_true",
                     help="only the mapper part, with the stored EmerDiff K (e.g. after a new decoder stage)")
    cal.add_argument("--write", action="store_true", help="store the result in <weights>/emergent_seg.json")
    cal.add_argument("--verbose", action="store_true", help="print every candidate's score")
    cal.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "eval":
            run_eval(args, TerminalProgress("eval", not args.quiet))
        else:
            _run_calibrate(args, TerminalProgress("calibrate", not args.quiet))
    except (EmergentSegError, Interrupted) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
