"""``python -m emergent_seg eval`` and ``python -m emergent_seg.evaluation {eval,calibrate}``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from ..core.errors import EmergentSegError
from ..core.settings import QUALITY_PRESETS
from .calibration import (
    CALIBRATION_SEED,
    calibrate,
    calibrate_mapper,
    write_calibration,
)
from .datasets import open_dataset
from .methods import (
    DEFAULT_METHODS,
    METHODS,
    diffseg_settings,
    emerdiff_settings,
    model_size,
    parse_methods,
)
from .report import format_table
from .scoring import Evaluation, ImageRecords, evaluate

# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def _preset_or_steps(text: str) -> str | int:
    if text in QUALITY_PRESETS:
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise argparse.ArgumentTypeError(f"use a preset ({', '.join(QUALITY_PRESETS)}) or a number of steps >= 1")


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
    parser.add_argument("--records", default=None,
                        help="folder of per-image results; a rerun with the same model and options replays them "
                             "and computes only the missing images (default with --out: <out>_records)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N images of a dataset")
    parser.add_argument("--tau", type=float, default=None, help="DiffSeg KL threshold (default: calibrated / 1.1)")
    parser.add_argument("--tau-quantile", type=float, default=None,
                        help="adaptive DiffSeg threshold instead of --tau")
    parser.add_argument("--timestep", type=int, default=None, help="DiffSeg timestep (default: calibrated / 300)")
    parser.add_argument("--clusters", type=int, default=None, help="EmerDiff K (default: calibrated / 20)")
    parser.add_argument("--quality", choices=list(QUALITY_PRESETS), default=None,
                        help="mapper preset (default: the model's stored preset, else fast)")
    parser.add_argument("--steps", type=_preset_or_steps, default=None,
                        help="a custom number of mapper denoising steps, with the paper's symmetric difference "
                             "(instead of the preset's); a preset name here means --quality")
    parser.add_argument("--sigma", type=float, default=None,
                        help="mapper smoothing in model pixels (default: 4 px at 512 px, scaled to the model size)")
    parser.add_argument("--size", type=int, default=None, help="model input side (default: native)")
    parser.add_argument("--seed", type=int, default=0, help="seed of k-means and the mapper's noise")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    from ..engines import add_engine_arguments
    add_engine_arguments(parser, batch_help="Ray: images per task (default 8)", batch_default=8)


def _open_dataset(args: argparse.Namespace, size: int) -> Any:
    """The dataset ``args`` name; ``size`` is the side of generated scenes (files keep theirs)."""
    name = getattr(args, "dataset", "synthetic")
    return open_dataset(name, getattr(args, "data", None), int(getattr(args, "scenes", 200) or 200),
                        getattr(args, "limit", None), size=size if name == "synthetic" else None,
                        seed=getattr(args, "scene_seed", None))


def _setup(args: argparse.Namespace, device: str | None = None) -> dict[str, Any]:
    """What an evaluation of ``args`` needs: methods, backend, model size, dataset and settings
    (the same for this process and for every Ray worker)."""
    methods = parse_methods(getattr(args, "methods", ",".join(DEFAULT_METHODS)))
    needs_model = any(METHODS[m].embedding != "colour" for m in methods)
    backend = None
    device = device or getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    if needs_model:
        from ..core.backends.loading import load_backend
        backend = load_backend(getattr(args, "model", None), device)
    size = getattr(args, "size", None)
    msize = int(size) if size else (model_size(backend) if backend is not None else 32)
    dataset = _open_dataset(args, msize)
    settings = None
    if backend is not None:
        settings = diffseg_settings(backend, getattr(args, "tau", None), getattr(args, "tau_quantile", None),
                                    timestep=getattr(args, "timestep", None), dataset=dataset.name)
    quality, steps = getattr(args, "quality", None), getattr(args, "steps", None)
    if isinstance(steps, str):
        quality, steps = steps, None
    opts = emerdiff_settings(backend, msize, quality=quality, steps=steps, clusters=getattr(args, "clusters", None),
                             sigma=getattr(args, "sigma", None))
    return {"methods": methods, "backend": backend, "size": msize, "dataset": dataset, "settings": settings,
            "emerdiff": opts, "seed": int(getattr(args, "seed", 0) or 0)}


def _evaluate(setup: dict[str, Any], dataset: Any, records: ImageRecords | None, progress: Any = None) -> Evaluation:
    return evaluate(dataset, setup["methods"], setup["backend"], num_classes=setup["dataset"].num_classes,
                    settings=setup["settings"], emerdiff=setup["emerdiff"], size=setup["size"], seed=setup["seed"],
                    progress=progress, records=records)


def run_eval(args: argparse.Namespace, bar: Any = None) -> Evaluation:
    """``python -m emergent_seg eval``: build the dataset and backend from ``args``, print the
    markdown table, write it to ``args.out`` (and the JSON next to it) when given.

    ``--engine ray``: the images without a record are segmented on a Ray cluster (each worker
    writes its images' records), then this process computes the table from the records alone."""
    engine = getattr(args, "engine", "local") or "local"
    if hasattr(args, "batch_size"):
        from ..engines import check_engine_arguments
        check_engine_arguments(args)
    records = _records(args)
    if engine == "ray":
        if records is None:
            raise EmergentSegError("--engine ray keeps per-image results in --records; give --records DIR or --out")
        _run_on_ray(args, records)
    # the driver of a Ray run only replays records: its model stays on the CPU
    setup = _setup(args, "cpu" if engine == "ray" else None)
    dataset = setup["dataset"]
    progress = bar() if bar is not None else None
    ev = _evaluate(setup, dataset, records, progress)
    if records is not None and records.replayed:
        print(f"replayed {records.replayed} image(s) from {records.folder}", file=sys.stderr)
    model_name = getattr(args, "model", None) or "embedded tiny model (fixture/weights)"
    ev.meta.update(dataset=dataset.describe(), model=str(model_name), methods=setup["methods"])
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


class EvalShard:
    """The per-batch function of an evaluation: one loaded model; ``run(indices)`` evaluates
    those images of the dataset and writes their records (the Ray engine's actor body)."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.args = argparse.Namespace(**options)
        self.setup = _setup(self.args)
        self.records = _records(self.args)

    def run(self, indices: list[int]) -> list[str]:
        dataset = self.setup["dataset"]
        _evaluate(self.setup, dataset.subset(indices), self.records)
        names = dataset.names()
        return [names[i] for i in indices]


def _run_on_ray(args: argparse.Namespace, records: ImageRecords) -> None:
    """Evaluate every image without a record on Ray, ``--batch-size`` images per task."""
    from ..engines import RayOptions, absolute_paths, run_ray_tasks

    methods = parse_methods(getattr(args, "methods", ",".join(DEFAULT_METHODS)))
    dataset = _open_dataset(args, 1)                        # names only: no image is read
    todo = [i for i, name in enumerate(dataset.names()) if not records.has(name, methods)]
    batch = max(1, int(getattr(args, "batch_size", 8) or 8))
    batches = [todo[i:i + batch] for i in range(0, len(todo), batch)]
    options = absolute_paths({k: v for k, v in vars(args).items() if k != "func"}, ("out", "records", "model", "data"))
    opts = RayOptions(getattr(args, "address", None), getattr(args, "workers", None),
                      getattr(args, "cpus_per_worker", None), getattr(args, "gpus_per_worker", None))
    done = 0
    for names in run_ray_tasks(EvalShard, options, batches, opts,
                               on_start=lambda line: print(line, file=sys.stderr)):
        done += len(names)
        print(f"evaluated {done}/{len(todo)} image(s) on Ray", file=sys.stderr)


# options that change where or how a run reports, never its numbers
_NOT_SETTINGS = {"out", "records", "quiet", "device", "command", "func", "engine", "address", "workers",
                 "cpus_per_worker", "gpus_per_worker", "batch_size"}


def _records(args: argparse.Namespace) -> ImageRecords | None:
    """Per-image records for ``--records`` (or ``<out>_records`` next to ``--out``), keyed by the
    model's weights and every option that changes a number."""
    from ..runs import args_key

    folder = getattr(args, "records", None)
    out = getattr(args, "out", None)
    if not folder and out:
        folder = str(Path(out).with_suffix("")) + "_records"
    if not folder:
        return None
    return ImageRecords(folder, args_key(args, _NOT_SETTINGS)[2])


def _run_calibrate(args: argparse.Namespace, bar: Any = None) -> dict:
    from ..core.backends.loading import EMBEDDED_MODEL, load_backend
    from ..fixture.scenes import make_scenes

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
    """``python -m emergent_seg.evaluation {eval,calibrate} ...`` — ``eval`` is the CLI's eval
    with the EmerDiff/size/threshold options exposed; ``calibrate`` stores fixture defaults."""
    from ..progress import run_command

    parser = argparse.ArgumentParser(prog="python -m emergent_seg.evaluation",
                                     description="Score segmentation methods, or calibrate a model folder's defaults.")
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
    return run_command({"eval": run_eval, "calibrate": _run_calibrate}, parser.parse_args(argv))
