"""Many-image runs of ``segment``: which files to read, and a manifest that makes a rerun resume.

- :func:`expand_inputs`: files, folders (their images, sorted, not recursive), glob patterns
  (``"photos/**/*.jpg"``) and list files (``@list.txt``: one path per line, ``#`` comments;
  relative paths are relative to the list file).
- :class:`Manifest`: ``<out>/manifest.jsonl``, one JSON line per finished image, appended only
  after all of that image's files are written (each atomically). A rerun skips an image whose
  record has the same input (path, size, modification time), the same run key (model identity
  and every setting that changes the result) and whose outputs all still exist; anything else,
  including an image cut short by a crash or Ctrl-C, is done again. The last record of an image
  wins, so the file never needs rewriting.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .core.errors import EmergentSegError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MANIFEST_NAME = "manifest.jsonl"


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _list_file(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise EmergentSegError(f"cannot read the list file {path} ({exc.strerror or exc})") from None
    out = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line if os.path.isabs(line) else str(path.parent / line))
    return out


def expand_inputs(items: Iterable[str]) -> list[Path]:
    """Image files named by ``items`` (files, folders, globs, ``@list`` files), in order, each once.
    Raises one line for a name that matches nothing and for a run without any image."""
    found: list[Path] = []
    for item in items:
        if item.startswith("@"):
            found.extend(expand_inputs(_list_file(Path(item[1:]).expanduser())))
            continue
        path = Path(item).expanduser()
        if path.is_dir():
            images = sorted(p for p in path.iterdir() if _is_image(p))
            if not images:
                raise EmergentSegError(f"the folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            found.extend(images)
        elif glob.has_magic(item):
            images = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if _is_image(Path(p)))
            if not images:
                raise EmergentSegError(f"no image matches {item!r}")
            found.extend(images)
        else:
            found.append(path)  # checked for readability later, with the other arguments
    unique = list(dict.fromkeys(p.resolve() if p.exists() else p for p in found))
    return unique


def output_stems(paths: list[Path]) -> list[str]:
    """Output name stem per image: the file stem, or, where two images share a stem, the stem
    with its parent folders (``a/cat.jpg`` -> ``a_cat``) until the names differ."""
    stems = [p.stem for p in paths]
    depth = 1
    while len(set(stems)) < len(stems) and depth < 64:
        clash = {s for s in stems if stems.count(s) > 1}
        stems = [("_".join(p.parts[-depth - 1:-1] + (p.stem,)) if s in clash else s) for p, s in zip(paths, stems)]
        depth += 1
    if len(set(stems)) < len(stems):
        raise EmergentSegError("two inputs would write the same output names; rename one of them")
    return stems


def file_identity(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"path": str(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def model_identity(model: str | None) -> str:
    """A content hash of the model's weight files (SHA-256 over every ``.safetensors`` file, in
    name order; ``None`` = the embedded model's folder). About 2 s per GB."""
    from .core.backends.loading import EMBEDDED_MODEL

    root = Path(model).expanduser() if model else EMBEDDED_MODEL
    files = sorted(root.rglob("*.safetensors")) if root.is_dir() else [root]
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(root) if root.is_dir() else f.name).encode())
        with open(f, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def run_key(model_hash: str, settings: dict[str, Any]) -> str:
    """Short stable hash of what decides a result: the model and every setting."""
    text = json.dumps({"model": model_hash, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def args_key(args: Any, reporting_only: set[str]) -> tuple[dict[str, Any], str, str]:
    """``(settings, model hash, run key)`` of a command line: every option except those in
    ``reporting_only`` (where or how a run reports, never its result), and the ``model`` option's
    weights (:func:`model_identity`)."""
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in reporting_only and k != "model"}
    model_hash = model_identity(getattr(args, "model", None))
    return settings, model_hash, run_key(model_hash, settings)


@dataclass
class Manifest:
    """``<out>/manifest.jsonl`` (see the module docstring)."""

    path: Path

    @classmethod
    def in_folder(cls, out: Path) -> "Manifest":
        return cls(out / MANIFEST_NAME)

    def records(self) -> dict[str, dict]:
        """Latest record per input path; unreadable lines (a write cut short) are ignored."""
        latest: dict[str, dict] = {}
        if not self.path.exists():
            return latest
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                    latest[record["input"]["path"]] = record
                except (ValueError, KeyError, TypeError):
                    continue
        return latest

    @staticmethod
    def is_complete(record: dict | None, source: dict[str, Any], key: str, out: Path) -> bool:
        return (record is not None and record.get("input") == source and record.get("run_key") == key
                and all((out / name).is_file() for name in record.get("outputs", [])))

    def append(self, source: dict[str, Any], key: str, out: Path, written: list[Path], segments: int,
               seconds: float, settings: dict[str, Any], model_hash: str) -> None:
        record = {"input": source, "run_key": key, "outputs": [str(p.relative_to(out)) for p in written],
                  "segments": segments, "seconds": round(seconds, 3), "model": model_hash,
                  "settings": settings, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        torn = False
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, "rb") as f:   # a line cut short by a crash must not swallow this one
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(("\n" if torn else "") + json.dumps(record, sort_keys=True, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
