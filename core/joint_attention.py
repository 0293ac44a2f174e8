"""DiffSeg's aggregate from the joint attention of DiT models (Flux, SD3): the host-free part.

A DiT block attends over one sequence that holds text tokens and image tokens (and, for Flux
Kontext, reference-image tokens after the image). There is no resolution pyramid: every block
sees the same patch grid (2x2 latent patches, so 1024 px -> 64x64 tokens), and the "levels" of
DiffSeg become a chosen set of blocks.

Layout: ``q``/``k`` arrive as the host's attention receives them, ``[B, heads, N, d]`` after the
rotary embedding, with the image tokens at ``image = slice(start, start + h*w)`` in row-major
patch order. Only image queries against image keys enter the aggregate. An image row also puts
probability on text (and reference) keys; we renormalise over image keys, which is the same as a
softmax over the image keys alone -- so the text columns are never computed. The host's own
attention produces the block's output, untouched: capturing never changes the prediction.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .attention import DEFAULT_CHUNK_BYTES, head_mean_chunks
from .capture import AttentionCapture, LevelInfo
from .errors import EmergentSegError


def image_head_mean(q: torch.Tensor, k: torch.Tensor, image: slice, target: torch.Tensor, weight: float = 1.0,
                    budget_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
    """``target += weight * mean over heads of softmax(Q_img K_imgᵀ / sqrt(d))`` (over image keys).

    Args:
        q, k: ``[B, heads, N, d]`` (any float dtype); ``image`` selects the image tokens of ``N``.
        target: ``[B, n, n]`` float32/float64 running sum, ``n`` = image tokens (row = query).
        weight: this block's share of the aggregate.
        budget_bytes: memory for one head's query chunk of float32 probabilities.
    """
    b = int(q.shape[0])
    qi, ki = q[:, :, image].float(), k[:, :, image].float()
    n = int(qi.shape[2])
    if tuple(target.shape) != (b, n, n):
        raise EmergentSegError(f"the aggregate is {tuple(target.shape)} but this block has {n} image tokens "
                               f"for a batch of {b}; the image token range or the grid is wrong")
    for _ in head_mean_chunks(qi, ki, target, weight, budget_bytes):
        pass


@dataclass
class JointAttentionCapture:
    """Folds the chosen blocks' image attention into one aggregate as a DiT pass runs.

    The host adapter calls :meth:`observe` from inside each attention call with the running
    block's name and the image token range; blocks not in ``blocks`` are ignored. :meth:`result`
    checks that every chosen block ran exactly once and returns what KL Merge takes.

    Attributes:
        batch: images in the pass.
        grid: ``(h, w)`` image-token grid (latent size / patch size).
        blocks: names of the blocks to aggregate, e.g. ``"double_block.7"``; equal weights.
        image_size: ``(H, W)`` the labels should have.
        timestep: the pass's timestep, for display (DiT models report sigma x 1000).
    """

    batch: int
    grid: tuple[int, int]
    blocks: tuple[str, ...]
    image_size: tuple[int, int]
    timestep: int = 0
    aggregate_dtype: torch.dtype = torch.float32
    budget_bytes: int = DEFAULT_CHUNK_BYTES
    device: torch.device | str = "cpu"
    seen: set[str] = field(default_factory=set)
    aggregate: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        if not self.blocks:
            raise EmergentSegError("choose at least one block to capture")
        if len(set(self.blocks)) != len(self.blocks):
            raise EmergentSegError(f"a block is listed twice in {list(self.blocks)}")
        n = self.grid[0] * self.grid[1]
        self.aggregate = torch.zeros(self.batch, n, n, dtype=self.aggregate_dtype, device=self.device)

    def observe(self, block: str, q: torch.Tensor, k: torch.Tensor, image: slice) -> None:
        if block not in self.blocks:
            return
        if block in self.seen:
            raise EmergentSegError(f"block {block} ran twice in one pass; the host repeated it (a batch split?)")
        image_head_mean(q, k, image, self.aggregate, 1.0 / len(self.blocks), self.budget_bytes)
        self.seen.add(block)

    def result(self) -> AttentionCapture:
        missing = [b for b in self.blocks if b not in self.seen]
        if missing:
            raise EmergentSegError(f"blocks {missing} never ran; this model has no such blocks")
        level = LevelInfo(1, self.grid, len(self.blocks), 1.0)
        return AttentionCapture(self.aggregate, self.grid, self.image_size, (level,), timestep=int(self.timestep))


def parse_blocks(text: str, available: list[str], default: list[str]) -> list[str]:
    """The DiT blocks a ``levels`` text names, in execution order.

    ``""``/``"all"``/``"auto"`` -> ``default`` (the family's preset); ``"every"`` -> every block;
    otherwise comma-separated items such as ``double 9-18``, ``single 0``, ``double_block.12``
    or ``d9-18`` / ``s3`` (ranges inclusive)."""
    import re

    text = (text or "").strip().lower()
    if text in ("", "all", "auto", "*"):
        return list(default)
    if text == "every":
        return list(available)
    counts = {kind: sum(1 for name in available if name.startswith(kind)) for kind in ("double", "single")}
    listed = ", ".join(f"{kind} 0-{n - 1}" for kind, n in counts.items() if n)
    chosen: set[str] = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        m = re.fullmatch(r"(double|single|d|s)(?:_blocks?)?[\s._]*(\d+)(?:\s*-\s*(\d+))?", item)
        if m is None:
            raise EmergentSegError(f"levels item '{item}' is not a block range; use 'all' (the model's "
                                   f"preset), 'every', or items such as 'double 9-18' ({listed})")
        kind = "double" if m.group(1).startswith("d") else "single"
        first = int(m.group(2))
        last = int(m.group(3)) if m.group(3) else first
        if last < first or last >= counts[kind]:
            raise EmergentSegError(f"levels '{item}' is outside this model's blocks ({listed or 'none'})")
        chosen.update(f"{kind}_block.{i}" for i in range(first, last + 1))
    if not chosen:
        return list(default)
    return [name for name in available if name in chosen]
