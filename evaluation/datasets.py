"""Datasets the harness scores on: the synthetic held-out scenes, COCO-Stuff-27 and Cityscapes,
with the label tables and DiffSeg's preprocessing (centre crop, resize to 512)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import EmergentSegError

EVAL_SIZE = 512  # DiffSeg's preprocessing for COCO-Stuff-27 and Cityscapes

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
    from ..core.images import read_image
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

    def names(self) -> list[str]:
        """Each sample's name, in order, without generating any scene."""
        return [f"scene{self.seed + i}" for i in range(self.n)]

    def subset(self, indices: Sequence[int]) -> "_Subset":
        """The same dataset restricted to ``indices`` (a Ray worker's share)."""
        return _Subset(self, indices)

    def __iter__(self) -> Iterator[Sample]:
        return self.samples(range(self.n))

    def samples(self, indices: Iterable[int]) -> Iterator[Sample]:
        from ..fixture.scenes import TEXTURE_NAMES, make_scene

        for i in indices:
            scene = make_scene(self.seed + i, self.size)
            lut = torch.tensor([TEXTURE_NAMES.index(t) for t in scene.textures], dtype=torch.int64)
            yield Sample(f"scene{scene.seed}", scene.image, lut[scene.labels], scene.labels, scene.caption)


def _first_existing(root: Path, candidates: Sequence[str]) -> Path | None:
    for rel in candidates:
        p = root / rel
        if p.exists():
            return p
    return None


class _Subset:
    """Some samples of a dataset, by index, with its classes and description."""

    def __init__(self, parent: Any, indices: Sequence[int]) -> None:
        self.parent, self.indices = parent, list(indices)
        self.name, self.num_classes = parent.name, parent.num_classes
        self.class_names = parent.class_names

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[Sample]:
        return self.parent.samples(self.indices)

    def describe(self) -> str:
        return f"{len(self.indices)} images of {self.parent.describe()}"


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

    def names(self) -> list[str]:
        return [name for name, _, _ in self.items]

    def subset(self, indices: Sequence[int]) -> "_Subset":
        return _Subset(self, indices)

    def __iter__(self) -> Iterator[Sample]:
        return self.samples(range(len(self.items)))

    def samples(self, indices: Iterable[int]) -> Iterator[Sample]:
        for i in indices:
            name, img_path, lab_path = self.items[i]
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
