"""A large photo through ``segment`` with the embedded default model: peak memory and wall time.

Writes a 4000x3000 JPEG (a 256 px scene upscaled, with per-pixel noise so it compresses like a
photo), then runs ``python -m emergent_seg segment PHOTO --out DIR`` in a child process, exactly
as a user would, and reports:

- wall time of the whole command (model loading included) and the child's peak RSS
  (``ru_maxrss`` of the child, which is all of its allocations: torch's allocator included);
- the size of the written label map (it must be the photo's own 4000x3000);
- the same for the 256 px scene itself, as the baseline the photo is compared against (ratio).

    python benchmarks/bench_photo.py [--method diffseg|emerdiff] [--width 4000 --height 3000]

Targets (issue "miniature Stable Diffusion"): under 2 GB peak RSS and under 60 s on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_photo(path: Path, width: int, height: int) -> None:
    import torch.nn.functional as F
    from emergent_seg.fixture.scenes import EVAL_SEED, make_scene
    from PIL import Image

    scene = make_scene(EVAL_SEED + 4242, 256).image
    big = F.interpolate(scene[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    rng = np.random.RandomState(0)
    arr = (big.permute(1, 2, 0).numpy() * 255 + rng.normal(0, 6, (height, width, 3))).clip(0, 255)
    Image.fromarray(arr.astype(np.uint8)).save(path, quality=90)


def run(image: Path, out: Path, method: str) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one ``segment`` child process."""
    start = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run([sys.executable, "-m", "emergent_seg", "segment", str(image), "--out", str(out),
                           "--method", method, "--quiet"], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"segment failed ({proc.returncode}): {proc.stderr.strip()}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak < before:  # ru_maxrss of children is the largest child so far
        peak = before
    return seconds, peak / 1024.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=4000)
    p.add_argument("--height", type=int, default=3000)
    p.add_argument("--method", choices=["diffseg", "emerdiff"], default="diffseg")
    a = p.parse_args()
    from PIL import Image

    print(f"load: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small, photo = tmp / "scene.png", tmp / "photo.jpg"
        from emergent_seg.core.images import save_png
        from emergent_seg.fixture.scenes import EVAL_SEED, make_scene
        save_png(make_scene(EVAL_SEED + 4242, 256).image.permute(1, 2, 0), small)
        make_photo(photo, a.width, a.height)
        print(f"photo: {a.width}x{a.height} JPEG, {photo.stat().st_size / 1e6:.1f} MB")
        # the small run first: ru_maxrss of children only grows, so the photo's peak is its own
        t_small, rss_small = run(small, tmp / "out_small", a.method)
        t_big, rss_big = run(photo, tmp / "out_photo", a.method)
        labels = Image.open(tmp / "out_photo" / "photo_labels.png")
        masks = sorted((tmp / "out_photo").glob("photo_seg*.png"))
        print(f"256 px scene : {t_small:6.1f} s, peak RSS {rss_small:7.0f} MB")
        print(f"{a.width}x{a.height} : {t_big:6.1f} s, peak RSS {rss_big:7.0f} MB "
              f"(label map {labels.size[0]}x{labels.size[1]}, {len(masks)} masks)")
        print(f"ratio photo / scene: time {t_big / t_small:.2f}x, peak RSS {rss_big / rss_small:.2f}x")
        ok = rss_big < 2048 and t_big < 60 and labels.size == (a.width, a.height)
        print("targets (< 2048 MB, < 60 s, label map at the photo's size):", "met" if ok else "NOT met")


if __name__ == "__main__":
    main()
