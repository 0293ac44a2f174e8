"""Where a many-image ``segment`` run executes: in this process (``--engine local``) or on a Ray
cluster (``--engine ray``). One code path, two schedulers:

- :func:`plan_batches` cuts the images still to do into batches of at most ``--batch-size``,
  images of one shape next to each other (from the file headers, no pixels read);
- :class:`BatchSegmenter` holds one loaded model and segments a batch: it reads the images, fits
  them, runs one UNet pass per group of equal processing size and writes every output file;
- the driver (this process, in both engines) prints and appends each finished image to the
  output folder's manifest (``runs.py``), so local and Ray runs resume each other's work.

On Ray, each planned batch is one row of a Ray Data dataset and ``map_batches`` hands it, whole,
to an actor (one per GPU, or per ``--cpus-per-worker`` CPUs), so the batches -- and the bytes
written -- are the same as the local engine's. Workers write into ``--out`` themselves: on a
cluster of several machines it must be a folder every node sees at the same path.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .core.backend import Progress
from .core.errors import EmergentSegError

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class WorkItem:
    """One image of a run: its output name stem and its file (``scene`` sources have no file)."""

    stem: str
    path: str


@dataclass(frozen=True)
class Finished:
    """What the worker reports for one segmented image (``outputs`` are absolute paths)."""

    stem: str
    path: str
    outputs: tuple[str, ...]
    segments: int
    seconds: float
    warning: str = ""


def shape_key(path: str) -> tuple[float, int]:
    """Sort key that puts images of one aspect and size next to each other (header only)."""
    from .core.images import check_readable

    h, w = check_readable(path)
    return (round(h / w, 4), h * w)


def plan_batches(items: list[WorkItem], batch_size: int) -> list[list[WorkItem]]:
    """Batches of at most ``batch_size`` images, ordered by shape (stable, so equal shapes keep
    the input order). Images whose processing sizes still differ inside a batch run in separate
    passes; the order only makes that rare."""
    if batch_size < 1:
        raise EmergentSegError(f"--batch-size must be at least 1, got {batch_size}")
    by_shape = batch_size > 1 and all(it.path for it in items)      # generated scenes have no file
    ordered = sorted(items, key=lambda it: shape_key(it.path)) if by_shape else list(items)
    return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]


class BatchSegmenter:
    """One loaded model and the run's options; :meth:`segment` does one batch end to end.

    ``options`` is the ``segment`` command line as a dict (``vars(args)``), so a Ray actor gets
    exactly what the local engine uses."""

    def __init__(self, options: dict[str, Any]) -> None:
        from .core.backends.loading import load_backend
        from .core.images import native_side

        self.args = argparse.Namespace(**options)
        device = self.args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.backend = load_backend(self.args.model, device)
        self.native = native_side(self.backend)
        self.cond = self.backend.encode_prompt(self.args.prompt) if self.args.prompt else None

    def run(self, batch: list[dict[str, str]]) -> list[dict[str, Any]]:
        """:meth:`segment` on plain data (the Ray engine's call)."""
        return [asdict(f) for f in self.segment([WorkItem(**w) for w in batch])]

    def segment(self, batch: list[WorkItem], progress: Callable[[], Progress] = Progress,
                images: dict[str, torch.Tensor] | None = None) -> list[Finished]:
        """Segment ``batch`` and write its files; ``images`` supplies pixels for items without a
        file (the generated scenes)."""
        from .api import fit_to_memory
        from .core.images import fit_image, read_image

        args = self.args
        started = time.perf_counter()
        groups: dict[tuple[int, int], list[tuple[WorkItem, torch.Tensor, torch.Tensor, str]]] = {}
        for item in batch:
            original = images[item.stem] if images and item.stem in images else read_image(item.path)
            fitted = fit_image(original, args.size, self.backend.size_multiple(), self.native)
            run_at, note = fit_to_memory(self.backend, fitted, args.max_memory, args.mode == "parity")
            # auto/keep: masks at the photo's own resolution; fixed sizes: at the cropped size
            target = original if str(args.size).lower() in ("auto", "keep") else fitted
            groups.setdefault(tuple(run_at.shape[-2:]), []).append((item, run_at, target, note or ""))
        done: list[Finished] = []
        for members in groups.values():
            seg = _segment_images(self.backend, torch.stack([m[1] for m in members]), self.cond, args, progress())
            for i, (item, _, target, note) in enumerate(members):
                written = write_outputs(Path(args.out), item.stem, target.unsqueeze(0), seg.select(i))
                done.append(Finished(item.stem, item.path, tuple(str(p) for p in written), seg.counts[i],
                                     0.0, note))
        seconds = (time.perf_counter() - started) / max(1, len(done))
        return [replace(f, seconds=seconds) for f in done]


def diffseg_overrides(args: argparse.Namespace) -> dict:
    """The DiffSeg options the user gave; the rest come from the model (``core/settings.py``)."""
    given = {"tau": args.tau, "tau_quantile": args.tau_quantile, "timestep": args.timestep}
    return {"iterations": args.iterations, "anchors_per_side": args.anchors, "mode": args.mode,
            "refine": args.refine == "kmeans", **{k: v for k, v in given.items() if v is not None}}


def emerdiff_overrides(args: argparse.Namespace) -> dict:
    return {"clusters": args.clusters, "quality": args.quality, "sigma": args.sigma}


def _segment_images(backend, images: torch.Tensor, cond, args: argparse.Namespace, progress: Progress):
    """Images ``[B,3,H,W]`` of one size -> Segmentation, by the method and refinement asked for
    (the Python API's :func:`api.segment_image`, with the options given on the command line)."""
    from .api import segment_image
    from .core.pipeline import image_side
    from .core.settings import DiffSegSettings, EmerDiffSettings

    emerdiff = EmerDiffSettings.for_model(backend, image_side(images), **emerdiff_overrides(args))
    diffseg = DiffSegSettings.for_model(backend, **diffseg_overrides(args))
    return segment_image(backend, images, cond, method=args.method, refine=args.refine, diffseg=diffseg,
                         emerdiff=emerdiff, seed=args.seed, progress=progress)


def write_outputs(out: Path, stem: str, image: torch.Tensor, seg) -> list[Path]:
    """``<stem>_labels.png``, ``<stem>_overlay.png`` and ``<stem>_segNN.png`` per segment, at the
    size of ``image`` ``[1,3,H,W]`` (labels resized nearest when the segmentation is smaller).
    Masks are written one at a time as 8-bit images, so a 12-megapixel photo stays cheap."""
    from .core.images import save_png
    from .core.masks import render_overlay
    from .core.segmentation import Segmentation

    out.mkdir(parents=True, exist_ok=True)
    # masks of an earlier run with more segments must not stay beside the new ones
    for stale in out.glob(f"{stem}_seg[0-9][0-9]*.png"):
        suffix = stale.stem[len(stem) + 4:]
        if suffix.isdigit() and int(suffix) >= seg.counts[0]:
            stale.unlink()
    hw = tuple(int(v) for v in image.shape[-2:])
    labels = seg.labels[0]
    if tuple(labels.shape) != hw:
        labels = torch.nn.functional.interpolate(labels[None, None].to(torch.float32), size=hw,
                                                 mode="nearest-exact")[0, 0].to(torch.uint8 if seg.counts[0] <= 256
                                                                                  else torch.int64)
        seg = Segmentation(labels.unsqueeze(0).to(torch.int64), seg.counts, seg.words, None, seg.method, seg.info)
    written = [out / f"{stem}_labels.png", out / f"{stem}_overlay.png"]
    save_png(labels, written[0])
    save_png(render_overlay(image, seg)[0].permute(1, 2, 0), written[1])
    for i in range(seg.counts[0]):
        path = out / f"{stem}_seg{i:02d}.png"
        save_png((labels == i).to(torch.uint8) * 255, path)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------

def run_local(options: dict[str, Any], batches: list[list[WorkItem]], progress: Callable[[], Progress],
              images: dict[str, torch.Tensor] | None = None,
              worker: BatchSegmenter | None = None) -> Iterator[Finished]:
    """Every batch in this process, one after another, with the terminal's progress bar
    (``worker``: a model already loaded for these options; else one is loaded if there is work)."""
    if not batches:
        return
    worker = worker or BatchSegmenter(options)
    for batch in batches:
        yield from worker.segment(batch, progress, images)


class _RayWorker:
    """The Ray Data actor: one ``worker_class(options)`` (a loaded model); a row is one planned
    batch, as JSON, and its results go back as one JSON row each."""

    def __init__(self, worker_class: type, options: dict[str, Any], threads: int) -> None:
        torch.set_num_threads(int(threads))
        self.worker = worker_class(options)

    def __call__(self, rows: dict[str, Any]) -> dict[str, list]:
        results: list[str] = []
        for text in rows["batch"]:
            results.append(json.dumps(self.worker.run(json.loads(str(text)))))
        return {"result": results}


@dataclass(frozen=True)
class RayOptions:
    """``--address``, ``--workers``, ``--cpus-per-worker`` and ``--gpus-per-worker``."""

    address: str | None = None
    workers: int | None = None
    cpus_per_worker: int | None = None
    gpus_per_worker: float | None = None


def _need_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise EmergentSegError("--engine ray needs Ray Data: pip install 'ray[data]' (or pip install -e '.[ray]' in "
                               "this checkout), then rerun") from None
    return ray


def ray_layout(resources: dict[str, float], opts: RayOptions) -> tuple[int, int, float]:
    """``(workers, cpus per worker, gpus per worker)`` for a cluster's resources: one worker per
    GPU when the cluster has GPUs, else one per ``cpus_per_worker`` CPUs (default 4, at most the
    cluster's CPUs)."""
    cpus = int(resources.get("CPU", 1))
    gpus = int(resources.get("GPU", 0))
    gpu_each = opts.gpus_per_worker if opts.gpus_per_worker is not None else (1.0 if gpus else 0.0)
    cpu_each = opts.cpus_per_worker or (1 if gpu_each else min(4, max(1, cpus)))
    if cpu_each > cpus:
        raise EmergentSegError(f"--cpus-per-worker {cpu_each} is more than the cluster's {cpus} CPUs")
    if gpu_each and not gpus:
        raise EmergentSegError("--gpus-per-worker was given but the Ray cluster has no GPUs")
    by_cpu = max(1, cpus // cpu_each)
    by_gpu = max(1, int(gpus // gpu_each)) if gpu_each else by_cpu
    workers = opts.workers or min(by_cpu, by_gpu)
    if workers < 1:
        raise EmergentSegError(f"--workers must be at least 1, got {workers}")
    return workers, cpu_each, gpu_each


def run_ray_tasks(worker_class: type, options: dict[str, Any], batches: list[list[Any]], opts: RayOptions,
                  on_start: Callable[[str], None] | None = None) -> Iterator[Any]:
    """Every batch on a Ray cluster (``opts.address``, or a local one started here): Ray Data
    ``map_batches`` with a pool of actors that each build one ``worker_class(options)`` and call
    its ``run(batch)`` on whole planned batches. Yields each batch's result as it finishes."""
    if not batches:
        return
    ray = _need_ray()
    import logging

    logging.getLogger("ray.data").setLevel(logging.ERROR)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=opts.address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        workers, cpu_each, gpu_each = ray_layout(ray.cluster_resources(), opts)
        workers = min(workers, len(batches))
        if on_start:
            on_start(f"Ray: {workers} worker{'s' if workers != 1 else ''} x {cpu_each} CPU"
                     + (f" + {gpu_each:g} GPU" if gpu_each else "") + f", {len(batches)} batches")
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        rows = [{"batch": json.dumps(batch)} for batch in batches]
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
        results = dataset.map_batches(
            _RayWorker, fn_constructor_kwargs={"worker_class": worker_class, "options": options, "threads": cpu_each},
            batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpu_each,
            num_gpus=gpu_each or None)
        for row in results.iter_rows():
            yield json.loads(row["result"])
    except Exception as exc:
        if isinstance(exc, EmergentSegError):
            raise
        raise EmergentSegError(f"the Ray run failed: {describe_failure(exc)}") from None
    finally:
        if started_here:
            ray.shutdown()


def run_ray(options: dict[str, Any], batches: list[list[WorkItem]], opts: RayOptions,
            on_start: Callable[[str], None] | None = None) -> Iterator[Finished]:
    """``segment``'s batches on Ray (see :func:`run_ray_tasks`)."""
    plain = [[asdict(w) for w in batch] for batch in batches]
    for result in run_ray_tasks(BatchSegmenter, options, plain, opts, on_start):
        for f in result:
            yield Finished(**{k: tuple(v) if k == "outputs" else v for k, v in f.items()})


def absolute_paths(options: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """``options`` with the paths under ``keys`` made absolute: a Ray worker on another machine
    (or in another folder) must find the same files."""
    out = dict(options)
    for key in keys:
        value = out.get(key)
        if not value:
            continue
        path = Path(str(value)).expanduser()
        if path.exists() or key in ("out", "records"):      # output folders may not exist yet
            out[key] = str(path.resolve())
    return out


def add_engine_arguments(p: argparse.ArgumentParser, batch_help: str, batch_default: int) -> None:
    """``--batch-size`` and the engine options, shared by ``segment`` and ``eval``."""
    p.add_argument("--batch-size", type=int, default=batch_default, help=batch_help)
    p.add_argument("--engine", choices=list(ENGINES), default="local",
                   help="local: this process; ray: a Ray cluster (needs the 'ray' extra), same results and "
                        "resume records")
    p.add_argument("--address", default=None,
                   help="Ray: the cluster to join (e.g. auto, or ray://head:10001); default: start a local one")
    p.add_argument("--workers", type=int, default=None,
                   help="Ray: model-holding workers (default: one per GPU, or per --cpus-per-worker CPUs)")
    p.add_argument("--cpus-per-worker", type=int, default=None,
                   help="Ray: CPUs per worker, also its torch threads (default 1 with GPUs, else 4 or all)")
    p.add_argument("--gpus-per-worker", type=float, default=None,
                   help="Ray: GPUs per worker (default 1 when the cluster has GPUs, else 0)")


def check_engine_arguments(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise EmergentSegError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers is not None and args.workers < 1:
        raise EmergentSegError(f"--workers must be at least 1, got {args.workers}")
    if args.cpus_per_worker is not None and args.cpus_per_worker < 1:
        raise EmergentSegError(f"--cpus-per-worker must be at least 1, got {args.cpus_per_worker}")
    if args.gpus_per_worker is not None and not args.gpus_per_worker >= 0:
        raise EmergentSegError(f"--gpus-per-worker must be >= 0, got {args.gpus_per_worker}")
    if args.engine == "ray":
        _need_ray()


def describe_failure(exc: BaseException) -> str:
    """The user-facing line of an error raised inside a Ray worker (Ray wraps it)."""
    cause = getattr(exc, "cause", None) or exc.__cause__
    while cause is not None and not isinstance(cause, EmergentSegError):
        cause = getattr(cause, "cause", None) or cause.__cause__
    return str(cause) if cause is not None else str(exc).splitlines()[0]


def print_warning(stem: str, note: str) -> None:
    if note:
        print(f"warning: {stem}: {note}", file=sys.stderr)
