"""Command line: ``python -m emergent_seg segment IMAGE... [--model PATH] --out DIR``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch

from .core.backend import Progress
from .core.errors import EmergentSegError, Interrupted


class TerminalProgress:
    """A Progress bound to a terminal bar (tqdm when installed, else a plain counter)."""

    def __init__(self, label: str, enabled: bool = True) -> None:
        self.label, self.enabled, self._bar = label, enabled, None

    def __call__(self) -> Progress:
        return Progress(on_update=self._update)

    def _update(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            print(f"\r{self.label}: {done}/{total}", end="" if done < total else "\n", file=sys.stderr)
            return
        if self._bar is None:
            self._bar = tqdm(total=total, desc=self.label, leave=False, file=sys.stderr)
        self._bar.total = total
        self._bar.n = done
        self._bar.refresh()
        if done >= total:
            self._bar.close()
            self._bar = None


def add_segment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="*", help="image files (PNG/JPEG/WebP); none with the default model = generated scenes")
    p.add_argument("--model", help="diffusers folder or SD1.x .safetensors; default: the embedded tiny model")
    p.add_argument("--out", default="out", help="output folder (default: out)")
    p.add_argument("--method", choices=["diffseg", "emerdiff"], default="diffseg",
                   help="diffseg: one UNet pass + KL merge; emerdiff: k-means on 16x16 queries + modulated denoising")
    p.add_argument("--refine", choices=["none", "kmeans", "emerdiff"], default="none",
                   help="kmeans: DiffSeg's optional k-means refinement; emerdiff: pixel-sharp masks via the mapper")
    p.add_argument("--tau", type=float, default=None, help="KL threshold (official: 1.1 COCO, 0.9 Cityscapes)")
    p.add_argument("--tau-quantile", type=float, default=None,
                   help="adaptive threshold: this quantile of the anchor-to-pixel KL (for flat attention)")
    p.add_argument("--iterations", type=int, default=3, help="merge iterations N (official 3)")
    p.add_argument("--anchors", type=int, default=16, help="anchors per side of the grid (official 16)")
    p.add_argument("--mode", choices=["fast", "parity"], default="fast",
                   help="fast: matrix-product merge; parity: reproduces the official code to the pixel")
    p.add_argument("--timestep", type=int, default=300, help="timestep of the capture pass (official 300)")
    p.add_argument("--prompt", default="", help="prompt for the pass; words label the segments")
    p.add_argument("--size", default=None,
                   help="512 = centre-crop square (official), 768x512 = width x height, keep = keep aspect")
    p.add_argument("--clusters", type=int, default=20, help="EmerDiff: number of low-res k-means clusters K")
    p.add_argument("--steps", choices=["fast", "faithful"], default="fast",
                   help="EmerDiff mapper: fast = one step + x0 decode, faithful = 15 DDIM steps from t=281")
    p.add_argument("--seed", type=int, default=0, help="seed for k-means and noise")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emergent_seg",
                                     description="Segment images with a Stable Diffusion UNet (DiffSeg, EmerDiff).")
    sub = parser.add_subparsers(dest="command", required=True)
    add_segment_args(sub.add_parser("segment", help="segment images; writes label maps, masks and overlays"))
    demo = sub.add_parser("demo", help="run the embedded tiny model on generated scenes and write a report")
    demo.add_argument("--out", default="out/demo")
    demo.add_argument("--scenes", type=int, default=8)
    demo.add_argument("--seed", type=int, default=1000)
    demo.add_argument("--quiet", action="store_true")
    ev = sub.add_parser("eval", help="score methods (mIoU, pixel accuracy after Hungarian matching)")
    ev.add_argument("--dataset", default="synthetic", help="synthetic | coco-stuff-27 | cityscapes")
    ev.add_argument("--data", help="dataset root for COCO-Stuff / Cityscapes")
    ev.add_argument("--model", help="model (default: the embedded tiny model)")
    ev.add_argument("--scenes", type=int, default=200)
    ev.add_argument("--methods", default="diffseg-fast,diffseg-parity,emerdiff,diffseg+mapper,random,color-kmeans,one-segment")
    ev.add_argument("--out", default=None, help="write the table as markdown here")
    ev.add_argument("--limit", type=int, default=None, help="evaluate only the first N images of a dataset")
    ev.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "segment":
            run_segment(args, TerminalProgress("segment", not args.quiet))
        elif args.command == "demo":
            run_demo(args, TerminalProgress("demo", not args.quiet))
        else:
            from .core.evaluate import run_eval
            run_eval(args, TerminalProgress("eval", not args.quiet))
    except (EmergentSegError, Interrupted) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _default_settings(backend: object, args: argparse.Namespace):
    from .core.pipeline import DiffSegSettings

    calibration = getattr(backend, "calibration", {}) or {}
    tau, quantile = args.tau, args.tau_quantile
    if tau is None and quantile is None:
        # The fixture ships calibrated defaults; SD models use the paper's COCO value.
        tau = calibration.get("tau", None if "tau_quantile" in calibration else 1.1)
        quantile = calibration.get("tau_quantile") if tau is None else None
    return DiffSegSettings(timestep=args.timestep, tau=tau, tau_quantile=quantile, iterations=args.iterations,
                           anchors_per_side=args.anchors, mode=args.mode, refine=args.refine == "kmeans")


def _segment_one(backend, image: torch.Tensor, cond, args: argparse.Namespace, progress: Progress):
    """image ``[1,3,H,W]`` -> Segmentation, by the method and refinement asked for."""
    from .core import pipeline

    if args.method == "emerdiff":
        from .core import emerdiff
        return emerdiff.segment_emerdiff(backend, image, cond, clusters=args.clusters, steps=args.steps,
                                         seed=args.seed, progress=progress)
    seg = pipeline.segment_diffseg(backend, image, cond, _default_settings(backend, args), progress=progress)
    if args.refine == "emerdiff":
        from .core import emerdiff
        seg = emerdiff.refine_segmentation(backend, image, seg, cond, steps=args.steps, seed=args.seed,
                                           progress=progress)
    return seg


def write_outputs(out: Path, stem: str, image: torch.Tensor, seg) -> list[Path]:
    """``<stem>_labels.png``, ``<stem>_overlay.png`` and ``<stem>_segNN.png`` per segment."""
    from .core.images import save_png
    from .core.masks import render_overlay, segment_masks

    out.mkdir(parents=True, exist_ok=True)
    written = [out / f"{stem}_labels.png", out / f"{stem}_overlay.png"]
    save_png(seg.labels[0], written[0])
    save_png(render_overlay(image, seg)[0].permute(1, 2, 0), written[1])
    masks, _ = segment_masks(seg)
    for i, mask in enumerate(masks):
        path = out / f"{stem}_seg{i:02d}.png"
        save_png(mask, path)
        written.append(path)
    return written


def run_segment(args: argparse.Namespace, bar: TerminalProgress) -> None:
    from .core.backends.loading import load_backend
    from .core.images import fit_image, read_image

    backend = load_backend(args.model, args.device)
    images: list[tuple[str, torch.Tensor]] = []
    if not args.images:
        if args.model:
            raise EmergentSegError("give at least one image to segment")
        from .fixture.scenes import make_scenes
        size = int(backend.calibration.get("config", {}).get("image_size", 32))
        images = [(f"scene{i:02d}", s.image) for i, s in enumerate(make_scenes(4, seed=1000, size=size))]
    else:
        default_size = "keep" if args.model is None else "512"
        for path in args.images:
            image = fit_image(read_image(path), args.size or default_size, backend.size_multiple())
            images.append((Path(path).stem, image))
    cond = backend.encode_prompt(args.prompt) if args.prompt else None
    out = Path(args.out)
    for stem, image in images:
        seg = _segment_one(backend, image.unsqueeze(0), cond, args, bar())
        written = write_outputs(out, stem, image.unsqueeze(0), seg)
        print(f"{stem}: {seg.counts[0]} segments -> {written[1]}")
