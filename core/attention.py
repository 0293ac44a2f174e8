"""Explicit attention in query chunks: ``softmax(Q Kᵀ / sqrt(d)) V`` with the probabilities exposed.

Optimised kernels (SDPA, xformers) never form the probability matrix, so capture sites compute
attention here. Probabilities are produced one query chunk at a time, so one layer never holds
``heads x Nq x Nk`` floats at once; a caller folds each chunk into what it needs and drops it.

Two shapes of the same maths:
- :func:`explicit_attention` hands every chunk of all heads ``[B, heads, c, Nk]`` to a callback
  (attention injection, tests, anything that needs the heads side by side);
- :func:`attention_with_head_mean` is what DiffSeg's capture needs, faster: one head and one
  larger query chunk at a time, each head added straight into the running head mean, so
  there is no head-sum pass and the matrix products run on taller blocks.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

# probs: [B, heads, chunk, Nk] float32 for queries [start, start+chunk) -> None
ChunkFn = Callable[[int, torch.Tensor], None]
# Replace the probabilities of a chunk (attention injection): (start, probs) -> probs
ProbsFn = Callable[[int, torch.Tensor], torch.Tensor]

DEFAULT_CHUNK_BYTES = 16 * 2**20


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, N, heads*d]`` -> ``[B, heads, N, d]``."""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, heads, N, d]`` -> ``[B, N, heads*d]``."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def query_chunk(batch: int, heads: int, n_query: int, n_key: int,
                budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Largest query chunk whose float32 probabilities fit ``budget_bytes``."""
    per_query = batch * heads * n_key * 4
    return max(1, min(n_query, budget_bytes // max(per_query, 1)))


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                       on_chunk: ChunkFn | None = None, replace_probs: ProbsFn | None = None,
                       budget_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """Attention with float32 probabilities, computed in query chunks.

    Args:
        q, k, v: ``[B, N, heads*d]`` projected tensors (any float dtype).
        heads: number of heads.
        on_chunk: sees each chunk's probabilities ``[B, heads, chunk, Nk]`` (float32). The tensor
            is a reused buffer: fold what you need before returning, never keep a reference.
        replace_probs: may return different probabilities for the chunk (attention injection).
        budget_bytes: memory for one chunk's probabilities.

    Returns:
        ``[B, Nq, heads*d]`` in ``q``'s dtype, before the output projection.
    """
    b, nq, _ = q.shape
    nk = k.shape[1]
    qh = split_heads(q, heads).float().reshape(b * heads, nq, -1)
    kt = split_heads(k, heads).float().reshape(b * heads, nk, -1).transpose(1, 2)
    vh = split_heads(v, heads).float().reshape(b * heads, nk, -1)
    scale = qh.shape[-1] ** -0.5
    out = torch.empty(b * heads, nq, vh.shape[-1], dtype=torch.float32, device=q.device)
    step = query_chunk(b, heads, nq, nk, budget_bytes)
    # One buffer reused by every chunk: fresh multi-MB allocations per chunk cost page faults.
    buffer = torch.empty(b * heads * step * nk, dtype=torch.float32, device=q.device)
    for start in range(0, nq, step):
        stop = min(nq, start + step)
        probs = buffer[: b * heads * (stop - start) * nk].view(b * heads, stop - start, nk)
        torch.baddbmm(probs, qh[:, start:stop], kt, beta=0.0, alpha=scale, out=probs)
        torch.ops.aten._softmax.out(probs, -1, False, out=probs)
        view = probs.view(b, heads, stop - start, nk)
        if on_chunk is not None:
            on_chunk(start, view)
        if replace_probs is not None:
            probs = replace_probs(start, view).reshape(b * heads, stop - start, nk)
        torch.bmm(probs, vh, out=out[:, start:stop])
    return merge_heads(out.view(b, heads, nq, -1)).to(q.dtype)


def attention_with_head_mean(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                             target: torch.Tensor, weight: float = 1.0,
                             budget_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """Attention output, and ``target += weight * mean over heads of softmax(Q Kᵀ / sqrt(d))``.

    Args:
        q, k, v: ``[B, N, heads*d]`` projected tensors (any float dtype).
        heads: number of heads.
        target: ``[B, Nq, Nk]`` float32/float64 running sum (row = query, column = key).
        weight: scale of this layer's head mean in ``target``.
        budget_bytes: memory for one head's query chunk of float32 probabilities.

    Returns:
        ``[B, Nq, heads*d]`` in ``q``'s dtype, before the output projection.
    """
    b, nq, _ = q.shape
    nk = k.shape[1]
    if tuple(target.shape) != (b, nq, nk):
        raise ValueError(f"target must be [{b}, {nq}, {nk}], got {tuple(target.shape)}")
    # [B, heads, N, d] views; one (image, head) slice is a plain strided [N, d] matrix
    qh, kh, vh = (split_heads(x, heads).float() for x in (q, k, v))
    out = torch.empty(b, heads, nq, vh.shape[-1], dtype=torch.float32, device=q.device)
    for i, h, start, stop, probs in head_mean_chunks(qh, kh, target, weight, budget_bytes):
        torch.mm(probs, vh[i, h], out=out[i, h, start:stop])
    return merge_heads(out).to(q.dtype)


def head_mean_chunks(qh: torch.Tensor, kh: torch.Tensor, target: torch.Tensor, weight: float = 1.0,
                     budget_bytes: int = DEFAULT_CHUNK_BYTES
                     ) -> Iterator[tuple[int, int, int, int, torch.Tensor]]:
    """``target += weight * mean over heads of softmax(Q Kᵀ / sqrt(d))``, one (image, query chunk,
    head) at a time; yields ``(image, head, start, stop, probs)`` after each head's probabilities
    ``[stop-start, Nk]`` float32 are added, so a caller can use them before the buffer is reused.

    ``qh``: ``[B, heads, Nq, d]``; ``kh``: ``[B, heads, Nk, d]``, both float32; ``target``: ``[B, Nq, Nk]``.
    """
    b, heads, nq, d = qh.shape
    nk = kh.shape[2]
    step = query_chunk(1, 1, nq, nk, budget_bytes)  # one (image, head) at a time
    buffer = torch.empty(step * nk, dtype=torch.float32, device=qh.device)
    scale = d ** -0.5
    alpha = weight / heads
    for i in range(b):
        for start in range(0, nq, step):
            stop = min(nq, start + step)
            probs = buffer[: (stop - start) * nk].view(stop - start, nk)
            rows = target[i, start:stop]
            for h in range(heads):
                torch.addmm(probs, qh[i, h, start:stop], kh[i, h].t(), beta=0.0, alpha=scale, out=probs)
                torch.ops.aten._softmax.out(probs, -1, False, out=probs)
                rows.add_(probs, alpha=alpha)
                yield i, h, start, stop, probs
