"""Many-image runs, measured in one process on one machine (print ``uptime`` beside it):

1. ``segment`` (DiffSeg, embedded model) on N images: one image per UNet pass vs batches of B
   equal-size images -- images per second and label agreement;
2. the same batched run on a local Ray cluster (``--engine ray``): Ray's overhead, with the
   cluster's start-up reported apart from the run;
3. where EmerDiff's mapper spends its time, and how far a modulation's change reaches in the
   latent (the measurement behind decoding whole images, see README "Large runs"): for the
   embedded model and a random-weight SD1.5-shaped UNet + VAE at 256 and 512 px, the decode's
   share of the mapper's time, and the share of the latent (and of its bounding box) where a
   ``fast``-preset run differs from the reference by more than 10 % / 1 % of its peak.

    python benchmarks/bench_runs.py                 # about 10 minutes on 2 cores
    python benchmarks/bench_runs.py --smoke         # seconds: 4 images, embedded model only
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from emergent_seg.core.images import save_png
from emergent_seg.engines import BatchSegmenter, RayOptions, WorkItem, plan_batches, run_ray
from emergent_seg.fixture.scenes import make_scenes

ROOT = Path(__file__).resolve().parents[1]


def make_images(folder: Path, n: int) -> list[WorkItem]:
    """``n`` images at 256 px (generated scenes), written as PNG like a user's folder."""
    items = []
    for i, scene in enumerate(make_scenes(n, seed=3000, size=256)):
        path = folder / f"img{i:03d}.png"
        save_png(scene.image.permute(1, 2, 0), path)
        items.append(WorkItem(path.stem, str(path)))
    return items


def options(out: Path) -> dict:
    from emergent_seg import cli

    parser = argparse.ArgumentParser()
    cli.add_segment_args(parser)
    return {k: v for k, v in vars(parser.parse_args(["--out", str(out), "--quiet"])).items()}


def labels(out: Path) -> dict[str, np.ndarray]:
    from PIL import Image

    result = {}
    for p in sorted(out.glob("*_labels.png")):
        with Image.open(p) as img:
            result[p.name] = np.asarray(img)
    return result


def same_bytes(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("*_labels.png"))
    return names == sorted(p.name for p in b.glob("*_labels.png")) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def agreement(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    same = sum(int((a[k] == b[k]).sum()) for k in a)
    return same / sum(a[k].size for k in a)


def bench_batches(work: Path, n: int, batch: int) -> None:
    items = make_images(work, n)
    runs: dict[str, tuple[float, Path]] = {}
    worker = BatchSegmenter(options(work / "warm"))
    worker.segment(items[:1])                                      # warm-up: first-call costs out of the timings
    for name, size in (("one at a time", 1), (f"batches of {batch}", batch)):
        out = work / f"local{size}"
        worker.args.out = str(out)
        start = time.perf_counter()
        for chunk in plan_batches(items, size):
            worker.segment(chunk)
        runs[name] = (time.perf_counter() - start, out)
    single, batched = runs["one at a time"], runs[f"batches of {batch}"]
    print(f"\n1. segment, DiffSeg, embedded model, {n} images of 256 px, local engine")
    for name, (seconds, _) in runs.items():
        print(f"   {name:<16} {seconds:7.2f} s   {n / seconds:6.2f} images/s")
    print(f"   batched / single: {single[0] / batched[0]:.2f}x the images per second; "
          f"labels equal on {100 * agreement(labels(single[1]), labels(batched[1])):.3f} % of pixels")

    import ray

    start = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    started = time.perf_counter() - start
    try:
        opts = options(work / "ray")
        start = time.perf_counter()
        first = None
        for _ in run_ray(opts, plan_batches(items, batch), RayOptions(cpus_per_worker=os.cpu_count())):
            first = first or time.perf_counter() - start
        on_ray = time.perf_counter() - start
    finally:
        ray.shutdown()
    print(f"\n2. the same {n} images in batches of {batch} on a local Ray cluster "
          f"(1 worker x {os.cpu_count()} CPUs)")
    print(f"   cluster start {started:.1f} s (once per run); run {on_ray:.2f} s = {n / on_ray:.2f} images/s, "
          f"including the worker's model load; first batch back after {first:.1f} s, the other "
          f"{n - batch} images {(n - batch) / max(1e-9, on_ray - first):.2f} images/s")
    print(f"   Ray / local: {on_ray / batched[0]:.2f}x the time of the local batched run; labels byte-equal: "
          f"{same_bytes(work / 'ray', batched[1])}")


def sd15_backend():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from emergent_seg.core.backends.diffusers import DiffusersBackend

    torch.manual_seed(0)
    configs = ROOT / "core" / "configs" / "sd15"
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(configs / "unet"))).eval()
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(configs / "vae"))).eval()
    return DiffusersBackend(unet, vae)


def quadrant_masks(grid: tuple[int, int]) -> torch.Tensor:
    """Four masks: the quadrants of the modulated grid (a random-weight UNet has no k-means
    structure to find, and the question is only how far a mask's modulation reaches)."""
    h, w = grid
    masks = torch.zeros(4, h, w)
    masks[0, : h // 2, : w // 2] = 1
    masks[1, : h // 2, w // 2:] = 1
    masks[2, h // 2:, : w // 2] = 1
    masks[3, h // 2:, w // 2:] = 1
    return masks


def bench_reach(backend, name: str, side: int, quadrants: bool) -> None:
    """The mapper's time split and how far each modulation's latent change reaches."""
    from emergent_seg.core import mapper
    from emergent_seg.core.backend import Progress
    from emergent_seg.core.lowres import add_noise, choose_site, label_masks, lowres_kmeans
    from emergent_seg.core.settings import EmerDiffSettings

    image = make_scenes(1, seed=77, size=side)[0].image[None]
    with torch.no_grad():
        latent = backend.encode(image)
        s = EmerDiffSettings.for_model(backend, side, quality="fast")
        hw = tuple(latent.shape[-2:])
        site = choose_site(backend, hw, s.grid, s.layer, s.depth)
        if quadrants:
            masks = quadrant_masks(site.grid(hw))
        else:
            low = lowres_kmeans(backend, latent, s.clusters, seed=0, grid=s.grid, layer=s.layer, depth=s.depth)
            masks = label_masks(low.lowres[0])[1]
        k = masks.shape[0]
        x_t = add_noise(backend, latent, s.t_m, 0)
        timesteps = mapper.denoise_timesteps(s.t_m, s.denoise_steps)
        todo = mapper.plan(k, len(timesteps), s.max_batch, s.inject, s.difference_mode)
        start = time.perf_counter()
        final, ref = mapper._denoise_members(backend, x_t, site, masks, [s.lam], timesteps,
                                             backend.empty_conditioning().expand(1), s.inject, s.inject_all_steps,
                                             s.difference_mode, todo, mapper.DEFAULT_CHUNK_BYTES, Progress())
        unet_s = time.perf_counter() - start
        start = time.perf_counter()
        mapper._decode_differences(backend, final, ref, k, s.difference_mode, todo["decode_batch"], latent.dtype,
                                   Progress())
        decode_s = time.perf_counter() - start
    rows = []
    for j in range(k):
        change = (final[j] - ref[0]).pow(2).sum(0).sqrt()
        peak = float(change.max())
        row = [float(masks[j].mean())]
        for rel in (0.1, 0.01):
            on = change > rel * peak
            ys, xs = on.nonzero(as_tuple=True)
            box = (int(ys.max() - ys.min()) + 1) * (int(xs.max() - xs.min()) + 1) / change.numel()
            row += [float(on.float().mean()), box]
        rows.append(row)
    mean = np.mean(np.array(rows), axis=0)
    print(f"   {name:<26} {side:4d} px  K={k:<2d} mapper {unet_s + decode_s:6.1f} s, decode {decode_s:6.1f} s "
          f"({100 * decode_s / (unet_s + decode_s):3.0f} %) | mask {100 * mean[0]:3.0f} % of the grid; "
          f"changed > 10 % of peak: {100 * mean[1]:3.0f} % of the latent (box {100 * mean[2]:3.0f} %); "
          f"> 1 %: {100 * mean[3]:3.0f} % (box {100 * mean[4]:3.0f} %)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="4 images, embedded model only (checks the script)")
    args = parser.parse_args()
    n, batch = (4, 2) if args.smoke else (args.images, args.batch_size)
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} (1/5/15 min), "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        bench_batches(Path(tmp), n, batch)
    from emergent_seg.core.backends.loading import load_backend

    print("\n3. EmerDiff mapper ('fast' preset: one UNet batch + one decode per mask): time split and the "
          "reach of a modulation")
    embedded = load_backend(None, "cpu")
    bench_reach(embedded, "embedded model (k-means)", 256, False)
    if not args.smoke:
        sd15 = sd15_backend()
        for side in (256, 512):
            bench_reach(sd15, "SD1.5 shapes, random", side, True)
    print(json.dumps({"done": True}))


if __name__ == "__main__":
    main()
