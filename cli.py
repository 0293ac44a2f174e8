"""Command line: ``python -m emergent_seg segment IMAGE... [--model PATH] --out DIR``."""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .core.errors import EmergentSegError
from .core.settings import QUALITY_PRESETS, DiffSegSettings, EmerDiffSettings
from .engines import (absolute_paths, add_engine_arguments, check_engine_arguments, diffseg_overrides,
                      emerdiff_overrides)
from .progress import TerminalProgress, run_command


def add_segment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="*",
                   help="images (PNG/JPEG/WebP), folders of images, glob patterns ('photos/**/*.jpg', quoted) "
                        "or @list.txt files with one path per line; none with the default model = generated scenes")
    p.add_argument("--model", help="diffusers folder or SD1.x .safetensors; default: the embedded miniature SD (256 px)")
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
    p.add_argument("--timestep", type=int, default=None,
                   help="timestep of the capture pass (default: the model's stored value, else the official 300)")
    p.add_argument("--prompt", default="", help="prompt for the pass; words label the segments")
    p.add_argument("--size", default="auto",
                   help="auto (default) = the whole image, aspect kept, at the model's native area, outputs at "
                        "the original size; 512 = centre-crop square (official); 768x512 = width x height; "
                        "keep = the image's own size rounded to the model's grid")
    p.add_argument("--clusters", type=int, default=None,
                   help="EmerDiff: number of low-res k-means clusters K (default: the model's stored value, else 20)")
    p.add_argument("--quality", "--steps", dest="quality", choices=list(QUALITY_PRESETS), default=None,
                   help="EmerDiff mapper preset: fast = one step + x0 decode, faithful = the paper's 15 DDIM "
                        "steps from t=281, fast-symmetric = one step, the paper's symmetric difference "
                        "(default: the model's stored preset, else fast; --steps is the old name)")
    p.add_argument("--sigma", type=float, default=None,
                   help="EmerDiff mapper smoothing in pixels of the processed image (default: the model's "
                        "stored value, else 4 px at 512 px)")
    p.add_argument("--seed", type=int, default=0, help="seed for k-means and noise")
    p.add_argument("--max-memory", type=float, default=8.0,
                   help="GB DiffSeg's attention may take; a larger processing size is scaled down with a "
                        "warning instead of running out of memory (default 8, 0 = no limit)")
    p.add_argument("--device", default=None,
                   help="cpu or cuda (default: cuda when the machine running the model has one; with "
                        "--engine ray, each worker decides for itself)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_engine_arguments(p, batch_default=1,
                         batch_help="images per UNet pass: images of one processing size are batched together "
                                    "(DiffSeg's capture and EmerDiff's feature pass); larger batches are faster "
                                    "on a GPU and take batch x the attention memory (default 1)")
    p.add_argument("--no-resume", action="store_true",
                   help="segment every image again, even those the output folder's manifest.jsonl records as done "
                        "with the same model and settings")


def main(argv: Sequence[str] | None = None) -> int:
    invoked = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    prog = invoked if invoked.startswith("emergent-seg") else "python -m emergent_seg"
    parser = argparse.ArgumentParser(prog=prog,
                                     description="Segment images with a Stable Diffusion UNet (DiffSeg, EmerDiff).")
    sub = parser.add_subparsers(dest="command", required=True)
    add_segment_args(sub.add_parser("segment", help="segment images; writes label maps, masks and overlays"))
    demo = sub.add_parser("demo", help="run the embedded miniature SD on generated scenes and write a report")
    demo.add_argument("--out", default="out/demo", help="report folder (default: out/demo)")
    demo.add_argument("--scenes", type=int, default=8, help="number of generated scenes (default: 8)")
    demo.add_argument("--seed", type=int, default=1000, help="seed of the first scene (default: 1000)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    from .evaluation.cli import add_eval_arguments
    add_eval_arguments(sub.add_parser("eval", help="score methods (mIoU, pixel accuracy after Hungarian matching)"))
    from .evaluation.cli import run_eval

    return run_command({"segment": run_segment, "demo": run_demo, "eval": run_eval}, parser.parse_args(argv))


def check_segment_args(args: argparse.Namespace) -> None:
    """Every option, the images and the output folder are checked before the model loads, so a
    typo costs milliseconds, not a model load and a UNet pass."""
    from .api import check_method
    from .core.backends.loading import check_model_path
    from .core.images import check_readable, parse_size

    check_method(args.method, args.refine)
    check_engine_arguments(args)
    if not args.max_memory >= 0:
        raise EmergentSegError(f"--max-memory must be >= 0 GB (0 = no limit), got {args.max_memory:g}")
    if args.model:
        check_model_path(args.model)
    parse_size(args.size)
    if args.tau is not None and args.tau_quantile is not None:
        raise EmergentSegError("give --tau or --tau-quantile, not both")
    if args.clusters is not None and args.clusters < 2:
        raise EmergentSegError(f"--clusters must be at least 2, got {args.clusters} (EmerDiff uses 20 on SD)")
    if args.sigma is not None and not args.sigma >= 0:
        raise EmergentSegError(f"--sigma must be >= 0 pixels, got {args.sigma}")
    # built without a model: the values are checked now, the model's defaults fill in later
    DiffSegSettings.for_model(None, **diffseg_overrides(args))
    EmerDiffSettings.for_model(None, **emerdiff_overrides(args))
    from .runs import expand_inputs, output_stems

    args.images = [str(p) for p in expand_inputs(args.images)]
    for path in args.images:
        check_readable(path)
    output_stems([Path(p) for p in args.images])
    prepare_output_folder(Path(args.out))


def prepare_output_folder(out: Path) -> None:
    """Create ``out`` (or accept an existing folder) and prove it is writable, with one line
    naming the problem otherwise."""
    if out.exists() and not out.is_dir():
        raise EmergentSegError(f"--out {out} is an existing file, not a folder; choose another path")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".emergent_seg_write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise EmergentSegError(f"cannot write to --out {out} ({exc.strerror or exc}); choose a writable folder") from None


def run_segment(args: argparse.Namespace, bar: TerminalProgress) -> None:
    from .engines import BatchSegmenter, RayOptions, WorkItem, plan_batches, print_warning, run_local, run_ray

    check_segment_args(args)
    options = {k: v for k, v in vars(args).items() if k != "func"}
    items: list[WorkItem] = []
    pixels: dict[str, torch.Tensor] | None = None
    worker = None
    if not args.images:
        if args.model:
            raise EmergentSegError("give at least one image to segment")
        if args.engine == "ray":
            raise EmergentSegError("--engine ray segments files; give images (the generated scenes run locally)")
        from .fixture.scenes import make_scenes

        worker = BatchSegmenter(options)
        pixels = {f"scene{i:02d}": s.image for i, s in enumerate(make_scenes(4, seed=1000, size=worker.native))}
        items = [WorkItem(stem, "") for stem in pixels]
    else:
        from .runs import output_stems

        items = [WorkItem(stem, path) for stem, path in zip(output_stems([Path(p) for p in args.images]), args.images)]
    out = Path(args.out)
    resume = _Resume(args, out) if args.images else None
    todo = [it for it in items if resume is None or not resume.done(it.path)]
    batches = plan_batches(todo, args.batch_size)
    if args.engine == "ray":
        options = absolute_paths(options, ("out", "model"))
        ray_opts = RayOptions(args.address, args.workers, args.cpus_per_worker, args.gpus_per_worker)
        finished = run_ray(options, batches, ray_opts, on_start=lambda line: print(line, file=sys.stderr))
    else:
        finished = run_local(options, batches, bar, pixels, worker)
    for done in finished:
        print_warning(done.stem, done.warning)
        written = [Path(p) for p in done.outputs]
        if resume is not None:
            resume.finished(done.path, written, done.segments, done.seconds)
        print(f"{done.stem}: {done.segments} segment{'s' if done.segments != 1 else ''} -> {written[1]}")
    if resume is not None and resume.skipped:
        print(f"{resume.skipped} image{'s' if resume.skipped != 1 else ''} already done with this model and "
              f"these settings (see {resume.manifest.path.name}; --no-resume redoes them)")


# options that change where or how a run reports, never its result
_NOT_SETTINGS = {"images", "out", "quiet", "no_resume", "command", "func", "device", "batch_size", "engine",
                 "address", "workers", "cpus_per_worker", "gpus_per_worker"}


class _Resume:
    """The manifest side of ``segment``: which images are done, and a record per finished one."""

    def __init__(self, args: argparse.Namespace, out: Path) -> None:
        from .runs import Manifest, args_key

        self.out, self.no_resume, self.skipped = out, args.no_resume, 0
        self.settings, self.model_hash, self.key = args_key(args, _NOT_SETTINGS)
        self.manifest = Manifest.in_folder(out)
        self.records = self.manifest.records()

    def done(self, path: str) -> bool:
        from .runs import file_identity

        if self.no_resume or not self.manifest.is_complete(self.records.get(path), file_identity(Path(path)),
                                                           self.key, self.out):
            return False
        self.skipped += 1
        return True

    def finished(self, path: str, written: list[Path], segments: int, seconds: float) -> None:
        from .runs import file_identity

        self.manifest.append(file_identity(Path(path)), self.key, self.out, written, segments, seconds,
                             self.settings, self.model_hash)


def _nearest_upscale(image: torch.Tensor, factor: int) -> torch.Tensor:
    """``[3,H,W]`` -> ``[3,H*f,W*f]`` by pixel repetition (keeps the tiny scenes crisp)."""
    return image.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


_DEMO_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:6px;text-align:center;vertical-align:middle}
img{width:256px;height:256px}td.caption{max-width:16em;text-align:left}
.summary{margin-bottom:1em}code{background:#f3f3f3;padding:1px 4px}"""


def _demo_html(rows: list[dict], summary: dict) -> str:
    """index.html of the demo; every piece of text and every attribute is escaped, no script."""
    from html import escape

    def img(name: str, alt: str) -> str:
        return f'<img src="{escape(name, quote=True)}" alt="{escape(alt, quote=True)}">'

    body = []
    for r in rows:
        body.append(
            "<tr>"
            f"<td>{escape(r['name'])}</td>"
            f"<td class=\"caption\">{escape(r['caption'])}</td>"
            f"<td>{img(r['image'], 'scene ' + r['name'])}</td>"
            f"<td>{img(r['overlay'], 'DiffSeg segments of ' + r['name'])}</td>"
            f"<td>{img(r['gt'], 'ground truth of ' + r['name'])}</td>"
            f"<td>{r['segments']} / {r['true_segments']}</td>"
            f"<td>{r['miou']:.3f}</td>"
            "</tr>")
    settings = ", ".join(f"{k}={v}" for k, v in summary["settings"].items() if v is not None)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>emergent-seg demo</title>
<style>{_DEMO_CSS}</style></head><body>
<h1>emergent-seg demo: DiffSeg on the embedded miniature SD</h1>
<div class="summary"><p>{len(rows)} generated scenes (seeds {summary['first_seed']}..{summary['last_seed']},
{summary['size']} px). Ground truth is drawn in the colours (and numbers) of the predicted segments it is matched to (Hungarian). Mean instance mIoU (Hungarian-matched per scene):
<b>{summary['mean_miou']:.3f}</b>. Settings: <code>{escape(settings)}</code>.
Model: {escape(summary['model'])}. Time: {summary['seconds']:.1f} s.</p></div>
<table><thead><tr><th>scene</th><th>caption</th><th>image</th><th>segments (DiffSeg)</th>
<th>ground truth (matched colours)</th><th>segments found / true</th><th>mIoU</th></tr></thead>
<tbody>
{chr(10).join(body)}
</tbody></table></body></html>
"""


def matched_colours(pred: torch.Tensor, truth: torch.Tensor) -> list[int]:
    """Per ground-truth segment (ids ``0..m-1`` of ``truth``), the index of the predicted segment
    it is matched to by the Hungarian matching on pixel overlap, so the report draws both in the
    same colour; unmatched truth segments get indices after the last predicted one."""
    from .core.metrics import hungarian

    n_pred, n_true = int(pred.max()) + 1, int(truth.max()) + 1
    overlap = torch.zeros(n_true, n_pred, dtype=torch.float64)
    overlap.index_put_((truth.reshape(-1), pred.reshape(-1)), torch.ones(pred.numel(), dtype=torch.float64),
                       accumulate=True)
    rows, cols = hungarian(overlap.numpy(), maximize=True)
    matched = dict(zip(rows.tolist(), cols.tolist()))
    spare = iter(range(n_pred, n_pred + n_true))
    return [int(matched[t]) if t in matched else next(spare) for t in range(n_true)]


def run_demo(args: argparse.Namespace, bar: TerminalProgress) -> None:
    """``python -m emergent_seg demo``: DiffSeg with the shipped model over generated scenes;
    writes ``sceneNN_{image,overlay,gt}.png``, ``summary.json`` and ``index.html`` into ``--out``."""
    if args.scenes < 1:
        raise EmergentSegError(f"--scenes must be at least 1, got {args.scenes}")
    _demo(args, bar)


def _demo(args: argparse.Namespace, bar: TerminalProgress) -> None:
    import json

    from .core.backends.loading import load_backend
    from .core.images import native_side, save_png
    from .core.masks import render_overlay
    from .core.metrics import instance_scores
    from .core.pipeline import segment_diffseg
    from .core.segmentation import Segmentation
    from .fixture.scenes import make_scenes

    start = time.perf_counter()
    backend = load_backend(None, "cpu")
    size = native_side(backend)
    settings = DiffSegSettings.for_model(backend)
    scenes = make_scenes(args.scenes, seed=args.seed, size=size)
    factor = max(1, 256 // size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = bar()
    progress.grow(len(scenes))
    rows = []
    for i, scene in enumerate(scenes):
        seg = segment_diffseg(backend, scene.image.unsqueeze(0), settings=settings)
        score = instance_scores(seg.labels[0], scene.labels)
        big = _nearest_upscale(scene.image, factor).unsqueeze(0)
        stem = f"scene{i:02d}"
        names = {"image": f"{stem}_image.png", "overlay": f"{stem}_overlay.png", "gt": f"{stem}_gt.png"}
        save_png(big[0].permute(1, 2, 0), out / names["image"])
        save_png(render_overlay(big, seg)[0].permute(1, 2, 0), out / names["overlay"])
        truth = Segmentation.from_labels(scene.labels.unsqueeze(0), method="ground truth")
        save_png(render_overlay(big, truth, colour_index=[matched_colours(seg.labels[0], truth.labels[0])])[0]
                 .permute(1, 2, 0), out / names["gt"])
        rows.append({"name": f"{stem} (seed {scene.seed})", "caption": scene.caption, **names,
                     "segments": seg.counts[0], "true_segments": scene.num_instances + 1,
                     "miou": score["miou"]})
        progress.advance()
    mean = sum(r["miou"] for r in rows) / len(rows)
    summary = {"mean_miou": mean, "scenes": len(rows), "first_seed": scenes[0].seed,
               "last_seed": scenes[-1].seed, "size": size, "model": "embedded miniature SD (fixture/weights)",
               "settings": {"timestep": settings.timestep, "tau": settings.tau,
                            "tau_quantile": settings.tau_quantile, "mode": settings.mode},
               "seconds": time.perf_counter() - start}
    (out / "summary.json").write_text(json.dumps({**summary, "rows": rows}, indent=2) + "\n")
    (out / "index.html").write_text(_demo_html(rows, summary), encoding="utf-8")
    for r in rows:
        print(f"{r['name']}: {r['segments']} segments (true {r['true_segments']}), mIoU {r['miou']:.3f}")
    print(f"mean mIoU {mean:.3f} over {len(rows)} scenes -> {out / 'index.html'}")
