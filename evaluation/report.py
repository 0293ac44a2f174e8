"""The markdown table ``eval`` prints."""
from __future__ import annotations

import math

from .scoring import Evaluation


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
              "then one Hungarian over the dataset (see evaluation/__init__.py)."
              + (" Instance mIoU = mean over images of per-image matched IoU against the scene's "
                 "instances; classes for the two protocols are the 16 region fills (9 texture patterns, 7 photos)." if synthetic else "")
              + " The two protocols are not comparable with each other. s/img includes shared work "
              "(e.g. DiffSeg inside diffseg+mapper) for every method that uses it."]
    return "\n".join(lines) + "\n"
