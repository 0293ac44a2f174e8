"""Pictures of EmerDiff's mapper on the embedded model: for a few held-out scenes, one row each of
the image, the ground truth, the low-res k-means masks upsampled (nearest), the mapper's labels,
and the first difference maps (brighter = that mask's modulation changed the pixel more).

    python benchmarks/mapper_maps.py --out docs/img/mapper_maps.png [--scenes 3] [--quality fast]

Prints, per scene, instance mIoU of nearest upsampling and of the mapper, and the median ratio of
each difference map inside its own low-res mask to outside it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from emergent_seg.core import emerdiff as E
from emergent_seg.core.backends.loading import load_backend
from emergent_seg.core.images import save_png
from emergent_seg.core.masks import render_overlay
from emergent_seg.core.metrics import instance_scores
from emergent_seg.core.segmentation import Segmentation
from emergent_seg.core.settings import EmerDiffSettings
from emergent_seg.fixture.scenes import EVAL_SEED, make_scene


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("mapper_maps.png"))
    p.add_argument("--scenes", type=int, default=3)
    p.add_argument("--first", type=int, default=EVAL_SEED)
    p.add_argument("--quality", default=None, help="mapper preset (default: the model's)")
    p.add_argument("--maps", type=int, default=3, help="difference maps shown per scene")
    a = p.parse_args()
    backend = load_backend(None)
    rows = []
    for seed in range(a.first, a.first + a.scenes):
        scene = make_scene(seed, 256)
        s = EmerDiffSettings.for_model(backend, 256, quality=a.quality)
        latent = backend.encode(scene.image[None])
        low = E.lowres_kmeans(backend, latent, k=s.clusters).lowres
        ids, masks = E.label_masks(low[0])
        dm = E.difference_maps(backend, latent, masks, steps=s.denoise_steps, difference=s.difference_mode)
        maps = E.smooth(dm.maps, s.sigma)
        mapped = ids[E.assign(maps)]
        near = E.upsample_labels(low, (256, 256))[0]
        ratios = []
        for i in range(len(ids)):
            inside = near == ids[i]
            if inside.any() and (~inside).any():
                ratios.append(float(dm.maps[i][inside].mean() / dm.maps[i][~inside].mean().clamp_min(1e-12)))
        print(f"seed {seed}: K={len(ids)} nearest {instance_scores(near, scene.labels)['miou']:.3f} "
              f"mapper {instance_scores(mapped, scene.labels)['miou']:.3f}; difference inside/outside "
              f"median {sorted(ratios)[len(ratios) // 2]:.2f}")
        img = scene.image[None]
        tiles = [scene.image,
                 render_overlay(img, Segmentation.from_labels(scene.labels[None]))[0],
                 render_overlay(img, Segmentation.from_labels(near[None]))[0],
                 render_overlay(img, Segmentation.from_labels(mapped[None]))[0]]
        for i in range(min(a.maps, len(ids))):
            m = dm.maps[i] / dm.maps[i].max().clamp_min(1e-12)
            tiles.append(m.expand(3, -1, -1))
        while len(tiles) < 4 + a.maps:
            tiles.append(torch.zeros(3, 256, 256))
        rows.append(torch.cat(tiles, dim=2))
    sheet = torch.cat(rows, dim=1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    save_png(sheet.permute(1, 2, 0), a.out)
    print(f"columns: image | truth | low-res nearest | mapper | difference maps 0..{a.maps - 1} -> {a.out}")


if __name__ == "__main__":
    main()
