"""From a Segmentation to what users feed into inpainting: selection, masks, overlay, UI payload.

Layouts (see docs/CONTRACTS.md):
- masks in and out: ``[B, H, W]`` float32 in [0, 1]; ``[H, W]`` is accepted wherever a mask goes in.
- images in and out of :func:`render_overlay`: core layout ``[B, 3, H, W]`` float32 in [0, 1]
  (a ComfyUI node permutes IMAGE ``[B, H, W, 3]`` with ``movedim(-1, 1)`` and back with ``movedim(1, -1)``).
- selections per image: ``list[list[int]]``, sorted segment indices, one list per image.

The selection grammar is described once, in :data:`SELECTION_TOOLTIP`; ``web/js/overlay_logic.js``
implements the same grammar (without the error checks) and the same :func:`palette`.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d
from kornia.morphology import dilation

from .errors import EmergentSegError
from .segmentation import Segmentation

SELECTION_TOOLTIP = (
    "Which segments go into the mask. Terms are separated by commas or spaces: "
    "indices (0,3,5), ranges (2-4), 'all', 'largest:N' / 'smallest:N' (by area, per image), "
    "or prompt words (cat, sky; needs a prompt on Capture Attention). "
    "Exclude with '!' or 'not' (!2, not sky) or 'except' (all except 2, 3); exclusions alone mean "
    "'all except'. Click segments in the overlay to toggle them. "
    "Indices refer to the numbers drawn on the overlay and apply to every image of a batch."
)

# ---------------------------------------------------------------------------------------------
# Selection grammar
# ---------------------------------------------------------------------------------------------

_SPLIT = re.compile(r"[\s,;]+")
_INDEX = re.compile(r"\d+")
_RANGE = re.compile(r"(\d+)-(\d+)")
_RANK = re.compile(r"(largest|smallest)(?::(\d+))?")
_WORD = re.compile(r"[^\W\d_][\w'-]*")
_HELP = ("use indices (0,3,5), ranges (2-4), all, largest:N, smallest:N, prompt words, "
         "or !N to exclude")


@dataclass(frozen=True)
class _Term:
    kind: str  # "all" | "index" | "range" | "largest" | "smallest" | "word"
    a: int = 0
    b: int = 0
    word: str = ""


@dataclass(frozen=True)
class _Parsed:
    include: tuple[_Term, ...]
    exclude: tuple[_Term, ...]
    none: bool


def _normalise(text: str) -> str:
    text = re.sub(r"\s*:\s*", ":", text)
    # "2 - 4" and "2- 4" are ranges; "5 -3" is left alone so that it errors instead of silently
    # becoming the range 3-5.
    text = re.sub(r"(?<=\d)(?:\s+-\s+|-\s+)(?=\d)", "-", text)
    return re.sub(r"!\s+", "!", text)


def _parse_term(token: str) -> _Term:
    low = token.lower()
    if low in ("all", "*"):
        return _Term("all")
    if _INDEX.fullmatch(low):
        return _Term("index", int(low))
    m = _RANGE.fullmatch(low)
    if m:
        a, b = int(m.group(1)), int(m.group(2))
        return _Term("range", min(a, b), max(a, b))
    m = _RANK.fullmatch(low)
    if m:
        n = 1 if m.group(2) is None else int(m.group(2))
        if n < 1:
            raise EmergentSegError(f"'{token}' selects nothing; use {m.group(1)}:1 or more")
        return _Term(m.group(1), n)
    if low.startswith(("largest:", "smallest:")):
        kind = low.split(":", 1)[0]
        raise EmergentSegError(f"'{token}' needs a whole number after the colon, e.g. {kind}:2")
    if re.fullmatch(r"-\d+(-\d+)?", low):
        raise EmergentSegError(f"'{token}' is not a valid selection term; to exclude a segment "
                               f"write !{low[1:]}")
    if _WORD.fullmatch(token):
        return _Term("word", word=low)
    raise EmergentSegError(f"'{token}' is not a valid selection term; {_HELP}")


def _parse(text: str) -> _Parsed:
    tokens = [t for t in _SPLIT.split(_normalise(text.strip())) if t]
    if not tokens or (len(tokens) == 1 and tokens[0].lower() == "none"):
        return _Parsed((), (), True)
    include: list[_Term] = []
    exclude: list[_Term] = []
    negate_next = False
    except_mode = False
    for token in tokens:
        low = token.lower()
        if low in ("and", "or", "+"):
            continue
        if low == "none":
            raise EmergentSegError("'none' cannot be combined with other selection terms")
        if low == "except":
            if except_mode:
                raise EmergentSegError("'except' may appear only once in a selection")
            if negate_next:
                raise EmergentSegError("'not' must be followed by a segment, range or word")
            except_mode = True
            continue
        if low == "not":
            if negate_next:
                raise EmergentSegError("'not not' is not allowed in a selection")
            negate_next = True
            continue
        negated = token.startswith("!")
        body = token[1:] if negated else token
        if not body:
            raise EmergentSegError("'!' must be followed by a segment, range or word, e.g. !2")
        if body.startswith("!"):
            raise EmergentSegError(f"'{token}' is not a valid selection term; {_HELP}")
        term = _parse_term(body)
        if negated or negate_next or except_mode:
            exclude.append(term)
        else:
            include.append(term)
        negate_next = False
    if negate_next:
        raise EmergentSegError("'not' must be followed by a segment, range or word")
    if except_mode and not exclude:
        raise EmergentSegError("'except' must be followed by the segments to leave out, "
                               "e.g. all except 2")
    return _Parsed(tuple(include), tuple(exclude), False)


def selection_syntax_error(text: str) -> str | None:
    """The error sentence for a syntactically invalid selection, or ``None`` if it parses.

    Checks syntax only (no segment counts or words), so a node can use it in ``validate_inputs``.
    """
    try:
        _parse(text)
    except EmergentSegError as e:
        return str(e)
    return None


def _areas(seg: Segmentation, image: int) -> list[int]:
    return torch.bincount(seg.labels[image].reshape(-1), minlength=seg.counts[image]).tolist()


def _labelled_words(seg: Segmentation) -> list[str]:
    seen: dict[str, None] = {}
    for per_image in seg.words:
        for w in per_image:
            if w is not None:
                seen.setdefault(w.lower(), None)
    return list(seen)


def _describe(n: int) -> str:
    if n == 0:
        return "which has no segments"
    if n == 1:
        return "which has 1 segment (0)"
    return f"which has {n} segments (0-{n - 1})"


def _resolve_terms(terms: Sequence[_Term], seg: Segmentation, image: int) -> set[int]:
    n = seg.counts[image]
    batch_hint = ""
    if seg.batch_size > 1 and len(set(seg.counts)) > 1:
        batch_hint = f" (segment counts per image: {', '.join(map(str, seg.counts))})"
    out: set[int] = set()
    areas: list[int] | None = None
    for t in terms:
        if t.kind == "all":
            out.update(range(n))
        elif t.kind == "index":
            if t.a >= n:
                raise EmergentSegError(
                    f"segment {t.a} does not exist in image {image}, {_describe(n)}{batch_hint}")
            out.add(t.a)
        elif t.kind == "range":
            if t.b >= n:
                raise EmergentSegError(f"segments {t.a}-{t.b} do not all exist in image {image}, "
                                       f"{_describe(n)}{batch_hint}")
            out.update(range(t.a, t.b + 1))
        elif t.kind in ("largest", "smallest"):
            if areas is None:
                areas = _areas(seg, image)
            sign = -1 if t.kind == "largest" else 1
            order = sorted(range(n), key=lambda i: (sign * areas[i], i))
            out.update(order[: t.a])
        else:
            labelled = _labelled_words(seg)
            if not labelled:
                raise EmergentSegError(
                    f"'{t.word}' is a word, but this segmentation has no word labels; connect a "
                    "prompt (CLIP + prompt) to Capture Attention to get word labels, or select by index")
            if t.word not in labelled:
                raise EmergentSegError(f"no segment is labelled '{t.word}'; labelled words are: "
                                       f"{', '.join(labelled)}")
            words = seg.words[image]
            out.update(i for i, w in enumerate(words) if w is not None and w.lower() == t.word)
    return out


def parse_selection(text: str, seg: Segmentation, image: int = 0, allow_empty: bool = False) -> list[int]:
    """Resolve a selection string (grammar in :data:`SELECTION_TOOLTIP`) for one image.

    Args:
        text: the selection, e.g. ``"0,3,5"``, ``"2-4"``, ``"largest:2"``, ``"cat, sky"``,
            ``"all except 2"``, ``"!2"``.
        seg: the segmentation the indices and words refer to.
        image: which image of the batch.
        allow_empty: return ``[]`` for an empty/``none`` selection, or one that resolves to no
            segment, instead of raising.

    Returns:
        Sorted, unique segment indices of that image.

    Raises:
        EmergentSegError: one sentence naming the bad token, index (and image), or word.
    """
    if not 0 <= image < seg.batch_size:
        raise EmergentSegError(f"image {image} does not exist; the batch has {seg.batch_size} images")
    parsed = _parse(text)
    if parsed.none:
        if allow_empty:
            return []
        raise EmergentSegError("the selection is empty; enter segment indices (e.g. 0,2), words, "
                               "'all', or click segments in the overlay")
    chosen = _resolve_terms(parsed.include, seg, image) if parsed.include else set(range(seg.counts[image]))
    chosen -= _resolve_terms(parsed.exclude, seg, image)
    if not chosen and not allow_empty:
        raise EmergentSegError(f"the selection '{text.strip()}' selects no segment in image {image}")
    return sorted(chosen)


def resolve_selection(seg: Segmentation, text: str, allow_empty: bool = False) -> list[list[int]]:
    """:func:`parse_selection` for every image of the batch: one sorted index list per image."""
    return [parse_selection(text, seg, b, allow_empty) for b in range(seg.batch_size)]


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------

def as_bhw(mask: torch.Tensor) -> torch.Tensor:
    """Any ``[H,W]``, ``[B,H,W]`` or ``[B,1,H,W]`` mask as float32 ``[B,H,W]`` clamped to [0,1]."""
    if mask.ndim < 2:
        raise EmergentSegError(f"a mask needs at least 2 dimensions (H, W), got shape {tuple(mask.shape)}")
    return mask.reshape(-1, mask.shape[-2], mask.shape[-1]).to(torch.float32).clamp(0.0, 1.0)


def selection_mask(seg: Segmentation, selected: Sequence[Sequence[int]]) -> torch.Tensor:
    """Union of the selected segments per image: float32 ``[B,H,W]`` (zeros where none selected)."""
    if len(selected) != seg.batch_size:
        raise EmergentSegError(f"{len(selected)} selections for a batch of {seg.batch_size} images")
    out = torch.zeros(seg.labels.shape, dtype=torch.float32, device=seg.labels.device)
    for b, idx in enumerate(selected):
        if len(idx):
            ids = torch.as_tensor(list(idx), dtype=seg.labels.dtype, device=seg.labels.device)
            out[b] = torch.isin(seg.labels[b], ids).to(torch.float32)
    return out


def union_mask(seg: Segmentation, selection_text: str, allow_empty: bool = False) -> torch.Tensor:
    """The selection (see :data:`SELECTION_TOOLTIP`) as one float32 ``[B,H,W]`` mask per image."""
    return selection_mask(seg, resolve_selection(seg, selection_text, allow_empty))


def segment_index(seg: Segmentation) -> list[tuple[int, int]]:
    """Row ``r`` of :func:`segment_masks` is segment ``index[r][1]`` of image ``index[r][0]``.

    Rows run through image 0's segments in order, then image 1's, and so on; image ``b`` starts
    at row ``sum(seg.counts[:b])``.
    """
    return [(b, s) for b, n in enumerate(seg.counts) for s in range(n)]


def segment_masks(seg: Segmentation) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Every segment as its own mask.

    Returns:
        ``(masks, index)``: float32 ``[N,H,W]`` with ``N = sum(seg.counts)`` in the row order of
        :func:`segment_index`, and that index list of ``(image, segment)`` pairs.
    """
    h, w = seg.size
    rows = [(seg.labels[b] == torch.arange(n, device=seg.labels.device).view(n, 1, 1)).to(torch.float32)
            for b, n in enumerate(seg.counts) if n]
    masks = torch.cat(rows) if rows else torch.zeros((0, h, w), dtype=torch.float32, device=seg.labels.device)
    return masks, segment_index(seg)


def invert_mask(mask: torch.Tensor) -> torch.Tensor:
    """``1 - mask`` as float32 ``[B,H,W]``."""
    return 1.0 - as_bhw(mask)


_CROSS = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])


def grow_mask(mask: torch.Tensor, px: int) -> torch.Tensor:
    """Grey dilation (``px > 0``) or erosion (``px < 0``) by a disk of radius ``|px|``; 0 is identity.

    The disk is approximated by a regular octagon, built as a Minkowski sum so the cost is linear
    in ``|px|`` rather than quadratic: a square of radius ``a = round(r(sqrt2 - 1))`` (two 1-D line
    dilations) followed by ``r - a`` dilations with the 3x3 cross (a diamond). Its flat sides sit
    at distance ``r`` and its diagonal sides within half a pixel of ``r``. Pixels outside the
    image are ignored (kornia's geodesic border), so a full mask stays full under either sign,
    as with ComfyUI's core GrowMask.

    Returns:
        float32 ``[B,H,W]`` in [0, 1].
    """
    m = as_bhw(mask)
    if px == 0 or m.numel() == 0:
        return m
    # Beyond the image diagonal every radius gives the same result.
    r = min(abs(int(px)), math.ceil(math.hypot(m.shape[-2], m.shape[-1])) + 1)
    x = m.unsqueeze(1)
    if px < 0:
        x = 1.0 - x  # erosion = complement of the dilation of the complement
    a = int(round(r * (math.sqrt(2.0) - 1.0)))
    if a:
        line = torch.ones(1, 2 * a + 1, dtype=x.dtype, device=x.device)
        x = dilation(x, line, engine="shift")
        x = dilation(x, line.t().contiguous(), engine="shift")
    cross = _CROSS.to(dtype=x.dtype, device=x.device)
    for _ in range(r - a):
        x = dilation(x, cross, engine="shift")
    if px < 0:
        x = 1.0 - x
    return x.squeeze(1).clamp(0.0, 1.0)


def feather_mask(mask: torch.Tensor, px: int) -> torch.Tensor:
    """Gaussian-soften mask edges so values change only within ``px`` pixels of an edge.

    Kernel ``2*px + 1`` with ``sigma = px / 3`` (the kernel spans 3 sigma); the image border is
    replicated, so a full mask stays full and a segment touching the border is not darkened there.
    ``px = 0`` is identity.

    Returns:
        float32 ``[B,H,W]`` in [0, 1].
    """
    if px < 0:
        raise EmergentSegError(f"feather must be 0 or more pixels, got {px}")
    m = as_bhw(mask)
    if px == 0 or m.numel() == 0:
        return m
    sigma = px / 3.0
    out = gaussian_blur2d(m.unsqueeze(1), (2 * px + 1, 2 * px + 1), (sigma, sigma), border_type="replicate")
    out = out.squeeze(1).clamp(0.0, 1.0)
    # The kernel sums to 1 only up to rounding: snap so fully covered pixels stay exactly 1.
    return torch.where(out > 1.0 - 1e-6, torch.ones_like(out), out)


def refine_mask(mask: torch.Tensor, invert: bool = False, grow: int = 0, feather: int = 0) -> torch.Tensor:
    """The Mask Output node's post-processing, in this order: invert, grow (negative shrinks),
    feather. Grow and feather therefore always act on the mask you get out (an inverted mask grows
    into the selected segments)."""
    m = as_bhw(mask)
    if invert:
        m = invert_mask(m)
    return feather_mask(grow_mask(m, grow), feather)


# ---------------------------------------------------------------------------------------------
# Colours, anchors, overlay
# ---------------------------------------------------------------------------------------------

_GOLDEN = 0.618033988749895


def palette(n: int) -> torch.Tensor:
    """``n`` distinct colours as uint8 ``[n, 3]`` RGB; colour ``i`` belongs to segment index ``i``.

    Golden-ratio hue steps, saturation 0.75, value alternating 0.95 / 0.78. Every step is one
    IEEE double operation with half-up rounding (``floor(x*255 + 0.5)``), so
    ``web/js/overlay_logic.js`` reproduces it bit for bit.
    """
    out = []
    for i in range(n):
        h = (i * _GOLDEN + 0.1) % 1.0
        s = 0.75
        v = 0.95 if i % 2 == 0 else 0.78
        h6 = h * 6.0
        sector = math.floor(h6)
        f = h6 - sector
        p = v * (1.0 - s)
        q = v * (1.0 - s * f)
        t = v * (1.0 - s * (1.0 - f))
        rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][sector % 6]
        out.append([math.floor(c * 255.0 + 0.5) for c in rgb])
    return torch.tensor(out, dtype=torch.uint8).reshape(n, 3)


def _grid_indices(size: int, grid: int, device: torch.device) -> torch.Tensor:
    # Cell g samples the source pixel under its centre: floor((g + 0.5) * size / grid).
    # The frontend maps a point x in [0, size) to cell floor(x * grid / size); see ui_payload.
    return ((torch.arange(grid, device=device, dtype=torch.float64) + 0.5) * size / grid).floor().long().clamp(max=size - 1)


def grid_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """``(grid_h, grid_w)``: the image size scaled down (never up) to at most ``max_side`` per side."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def downsample_labels(labels: torch.Tensor, max_side: int) -> torch.Tensor:
    """Nearest-neighbour downsample of one ``[H,W]`` label map to :func:`grid_size` (cell centres)."""
    h, w = labels.shape
    gh, gw = grid_size(h, w, max_side)
    ys = _grid_indices(h, gh, labels.device)
    xs = _grid_indices(w, gw, labels.device)
    return labels[ys][:, xs]


def segment_anchors(seg: Segmentation, max_side: int = 96) -> list[list[tuple[int, int]]]:
    """A point well inside each segment, ``(x, y)`` in image pixels, per image and segment.

    The point maximises the chessboard distance to the segment's edge or the image border, measured
    on a label grid of at most ``max_side`` per side (ties go to the point nearest the centroid);
    a segment too small to survive that grid falls back to its full-resolution pixel nearest its
    centroid. The returned pixel always carries the segment's label.
    """
    h, w = seg.size
    out: list[list[tuple[int, int]]] = []
    for b, n in enumerate(seg.counts):
        lab = seg.labels[b]
        grid = downsample_labels(lab, max_side)
        gh, gw = grid.shape
        ys = _grid_indices(h, gh, lab.device)
        xs = _grid_indices(w, gw, lab.device)
        onehot = (grid.unsqueeze(0) == torch.arange(n, device=lab.device).view(n, 1, 1)).to(torch.float32)
        dist = torch.zeros_like(onehot)
        cur = onehot.unsqueeze(1)
        while bool(cur.any()):
            dist += cur.squeeze(1)
            cur = -F.max_pool2d(-F.pad(cur, (1, 1, 1, 1), value=0.0), 3, stride=1)
        gy = torch.arange(gh, device=lab.device, dtype=torch.float32).view(1, gh, 1)
        gx = torch.arange(gw, device=lab.device, dtype=torch.float32).view(1, 1, gw)
        cells = onehot.sum((1, 2)).clamp(min=1.0)
        cy = (onehot * gy).sum((1, 2)) / cells
        cx = (onehot * gx).sum((1, 2)) / cells
        d2 = (gy - cy.view(n, 1, 1)) ** 2 + (gx - cx.view(n, 1, 1)) ** 2
        score = dist - d2 / float(gh * gh + gw * gw + 1)  # the centroid term only breaks ties
        score = torch.where(onehot > 0, score, torch.full_like(score, -1.0))
        best = score.reshape(n, -1).argmax(1)
        present = onehot.reshape(n, -1).any(1)
        row: list[tuple[int, int]] = []
        for k in range(n):
            if bool(present[k]):
                g = int(best[k])
                row.append((int(xs[g % gw]), int(ys[g // gw])))
                continue
            pts = (lab == k).nonzero()
            if pts.numel() == 0:
                row.append((w // 2, h // 2))
                continue
            c = pts.float().mean(0)
            p = pts[((pts.float() - c) ** 2).sum(1).argmin()]
            row.append((int(p[1]), int(p[0])))
        out.append(row)
    return out


# 3x5 digit glyphs, rows top to bottom.
_GLYPHS = {
    "0": ("111", "101", "101", "101", "111"),
    "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"),
    "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"),
    "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"),
    "7": ("111", "001", "001", "001", "001"),
    "8": ("111", "101", "111", "101", "111"),
    "9": ("111", "101", "111", "001", "111"),
}


def text_bitmap(text: str, scale: int = 1) -> torch.Tensor:
    """Digits rendered with the built-in 3x5 font (1 blank column between glyphs), bool
    ``[5*scale, (4*len-1)*scale]``."""
    cols: list[list[bool]] = [[] for _ in range(5)]
    for j, ch in enumerate(text):
        glyph = _GLYPHS[ch]
        for r in range(5):
            if j:
                cols[r].append(False)
            cols[r].extend(c == "1" for c in glyph[r])
    bm = torch.tensor(cols, dtype=torch.bool)
    return bm.repeat_interleave(scale, 0).repeat_interleave(scale, 1)


def _draw_label(img: torch.Tensor, text: str, x: int, y: int, scale: int) -> None:
    """Draw ``text`` in white on a dark box centred on (x, y), clamped inside ``img [3,H,W]`` (in place)."""
    bm = text_bitmap(text, scale).to(img.device)
    pad = scale
    bh, bw = bm.shape[0] + 2 * pad, bm.shape[1] + 2 * pad
    _, h, w = img.shape
    top = min(max(y - bh // 2, 0), max(h - bh, 0))
    left = min(max(x - bw // 2, 0), max(w - bw, 0))
    box = torch.zeros((bh, bw), dtype=torch.bool, device=img.device)
    box[pad:pad + bm.shape[0], pad:pad + bm.shape[1]] = bm
    box = box[: h - top, : w - left]
    region = img[:, top:top + box.shape[0], left:left + box.shape[1]]
    region.mul_(0.25)
    region[:, box] = 1.0


def render_overlay(images: torch.Tensor | None, seg: Segmentation, alpha: float = 0.5,
                   selected: Sequence[Sequence[int]] | None = None,
                   colour_index: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """Coloured segments, boundaries and index numbers over the images.

    Args:
        images: ``[B,3,H,W]`` float in [0,1] (core layout; a batch of 1 is reused for every image),
            or ``None`` to draw the segments on mid-grey. An image whose size differs from the
            segmentation gets the labels resized to it (nearest).
        seg: the segmentation; segment ``i`` is drawn in ``palette(...)[i]``.
        alpha: colour opacity of segments.
        selected: per image, the selected indices (e.g. :func:`resolve_selection`). Selected
            segments are drawn more opaque with a white boundary; the others are faded.
        colour_index: per image and segment, the palette index (and printed number) to draw it
            with instead of its own index, e.g. a ground truth drawn with the colours of the
            predicted segments it was matched to.

    Returns:
        float32 ``[B,3,H,W]`` in [0, 1] (core layout; ``movedim(1, -1)`` gives a ComfyUI IMAGE).
    """
    bsz = seg.batch_size
    if images is None:
        h, w = seg.size
        base = torch.full((bsz, 3, h, w), 0.5, dtype=torch.float32, device=seg.labels.device)
        alpha = 1.0 if alpha > 0 else 0.0
    else:
        if images.ndim != 4 or images.shape[1] != 3:
            raise EmergentSegError(f"overlay images must be [B,3,H,W], got shape {tuple(images.shape)}")
        if images.shape[0] not in (1, bsz):
            raise EmergentSegError(f"{images.shape[0]} images for a segmentation of {bsz}; connect the "
                                   "image batch that was segmented")
        base = images.to(torch.float32).clamp(0.0, 1.0).expand(bsz, -1, -1, -1)
    if selected is not None and len(selected) != bsz:
        raise EmergentSegError(f"{len(selected)} selections for a batch of {bsz} images")
    h, w = base.shape[-2:]
    labels = seg.labels
    if (h, w) != seg.size:
        labels = F.interpolate(labels.unsqueeze(1).float(), size=(h, w), mode="nearest-exact").squeeze(1).long()
    scale = max(1, min(h, w) // 96)
    line = max(1, min(h, w) // 384)
    anchors = segment_anchors(seg)
    sy, sx = h / seg.size[0], w / seg.size[1]
    out = torch.empty((bsz, 3, h, w), dtype=torch.float32, device=base.device)
    for b in range(bsz):
        n = seg.counts[b]
        lab = labels[b].to(base.device)
        names = list(range(n)) if colour_index is None else [int(v) for v in colour_index[b]]
        if len(names) != n:
            raise EmergentSegError(f"colour_index gives {len(names)} colours for {n} segments")
        colours = palette(max(names, default=-1) + 1).to(base.device, torch.float32) / 255.0
        colours = colours[torch.as_tensor(names, dtype=torch.int64, device=base.device)] if n else colours[:0]
        colour = colours[lab].permute(2, 0, 1)  # [3,H,W]
        sel = torch.zeros(n, dtype=torch.bool, device=base.device)
        if selected is None:
            a_seg = torch.full((n,), float(alpha), device=base.device)
        else:
            if len(selected[b]):
                sel[torch.as_tensor(list(selected[b]), device=base.device)] = True
            strong, faint = min(1.0, alpha * 1.5), alpha * 0.35
            a_seg = torch.where(sel, torch.tensor(strong, device=base.device), torch.tensor(faint, device=base.device))
        a = a_seg[lab].unsqueeze(0)
        img = base[b] * (1.0 - a) + colour * a
        edge = torch.zeros((h, w), dtype=torch.bool, device=base.device)
        edge[:, :-1] |= lab[:, 1:] != lab[:, :-1]
        edge[:-1, :] |= lab[1:, :] != lab[:-1, :]
        if line > 1:
            edge = F.max_pool2d(edge[None, None].float(), 2 * (line // 2) + 1, 1, line // 2)[0, 0] > 0
        edge_colour = torch.where(sel[lab], 1.0, 0.08)
        img = torch.where(edge.unsqueeze(0), edge_colour.unsqueeze(0).expand(3, -1, -1), img)
        for k, (ax, ay) in enumerate(anchors[b]):
            _draw_label(img, str(names[k]), int(ax * sx), int(ay * sy), scale)
        out[b] = img
    return out.clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Frontend payload
# ---------------------------------------------------------------------------------------------

def rle_encode(values: torch.Tensor) -> list[int]:
    """Run-length code of a flattened integer tensor as ``[v0, n0, v1, n1, ...]`` (row-major)."""
    flat = values.reshape(-1)
    if flat.numel() == 0:
        return []
    change = torch.nonzero(flat[1:] != flat[:-1]).reshape(-1) + 1
    starts = torch.cat([torch.zeros(1, dtype=torch.long, device=flat.device), change])
    ends = torch.cat([change, torch.tensor([flat.numel()], device=flat.device)])
    return torch.stack([flat[starts], ends - starts], 1).reshape(-1).tolist()


def rle_decode(rle: Sequence[int], height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`rle_encode`: int64 ``[height, width]``."""
    vals = torch.as_tensor(list(rle[0::2]), dtype=torch.long)
    runs = torch.as_tensor(list(rle[1::2]), dtype=torch.long)
    flat = torch.repeat_interleave(vals, runs)
    if flat.numel() != height * width:
        raise EmergentSegError(f"run-length code covers {flat.numel()} cells, expected {height * width}")
    return flat.reshape(height, width)


def ui_payload(seg: Segmentation, max_side: int = 128) -> list[dict]:
    """JSON-safe data for the frontend overlay (``ui["emergent_seg"]``), one dict per image.

    Each dict::

        {"image": b, "width": W, "height": H, "grid_w": w, "grid_h": h, "method": str,
         "labels_rle": [v0, n0, v1, n1, ...],
         "segments": [{"index": i, "word": str | None, "color": [r, g, b], "area": fraction,
                       "pixels": int, "anchor": [x, y]}, ...]}

    ``labels_rle`` is the row-major label grid of :func:`downsample_labels` (cell ``(gy, gx)``
    samples pixel ``(floor((gy+.5)*H/h), floor((gx+.5)*W/w))``); a point ``(x, y)`` in continuous
    image coordinates (``0 <= x < W``) lies in cell ``(floor(y*h/H), floor(x*w/W))``. ``color`` is :func:`palette`; ``pixels`` is the exact
    full-resolution area (the frontend ranks largest/smallest with it); ``anchor`` is where the
    overlay draws the index (:func:`segment_anchors`).
    """
    h, w = seg.size
    anchors = segment_anchors(seg)
    out: list[dict] = []
    for b, n in enumerate(seg.counts):
        grid = downsample_labels(seg.labels[b], max_side)
        colours = palette(n).tolist()
        pixels = _areas(seg, b)
        segments = [{
            "index": i,
            "word": seg.word(b, i),
            "color": colours[i],
            "area": round(pixels[i] / float(h * w), 6),
            "pixels": int(pixels[i]),
            "anchor": [int(anchors[b][i][0]), int(anchors[b][i][1])],
        } for i in range(n)]
        out.append({
            "image": b, "width": w, "height": h,
            "grid_w": int(grid.shape[1]), "grid_h": int(grid.shape[0]),
            "method": seg.method,
            "labels_rle": [int(v) for v in rle_encode(grid)],
            "segments": segments,
        })
    return out


# ---------------------------------------------------------------------------------------------
# Regions (Impact Pack's SEGS, built by nodes/segs.py)
# ---------------------------------------------------------------------------------------------

def crop_region(bbox: tuple[int, int, int, int], width: int, height: int,
                crop_factor: float) -> tuple[int, int, int, int]:
    """``bbox`` ``(x1, y1, x2, y2)`` (exclusive ends) grown ``crop_factor`` times around its centre
    and shifted/clipped to stay inside the image, as detailer crops are."""
    x1, y1, x2, y2 = bbox
    cw = min(width, max(1, int(round((x2 - x1) * crop_factor))))
    ch = min(height, max(1, int(round((y2 - y1) * crop_factor))))
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    nx1 = int(round(cx - cw / 2))
    ny1 = int(round(cy - ch / 2))
    nx1 = min(max(0, nx1), width - cw)
    ny1 = min(max(0, ny1), height - ch)
    return nx1, ny1, nx1 + cw, ny1 + ch


def segment_regions(seg: Segmentation, image: int, selected: Sequence[int], crop_factor: float = 3.0,
                    drop_size: int = 1) -> list[dict]:
    """One entry per selected segment of image ``image`` whose bounding box is at least
    ``drop_size`` pixels on both sides: ``index``, ``word``, ``bbox`` and ``crop_region``
    ``(x1, y1, x2, y2)`` (exclusive ends), ``mask`` (float32 ``[h, w]`` of the segment inside the
    crop region) and ``area`` (fraction of the image)."""
    if crop_factor < 1.0:
        raise EmergentSegError(f"crop_factor must be >= 1 (1 = the tight box), got {crop_factor}")
    if drop_size < 1:
        raise EmergentSegError(f"drop_size must be >= 1 pixel, got {drop_size}")
    labels = seg.labels[image]
    height, width = int(labels.shape[0]), int(labels.shape[1])
    out = []
    for i in selected:
        mask = labels == int(i)
        ys = torch.nonzero(mask.any(1)).flatten()
        xs = torch.nonzero(mask.any(0)).flatten()
        if ys.numel() == 0:
            continue
        bbox = (int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1)
        if bbox[2] - bbox[0] < drop_size or bbox[3] - bbox[1] < drop_size:
            continue
        region = crop_region(bbox, width, height, float(crop_factor))
        x1, y1, x2, y2 = region
        out.append({"index": int(i), "word": seg.word(image, int(i)), "bbox": bbox, "crop_region": region,
                    "mask": mask[y1:y2, x1:x2].to(torch.float32).cpu(),
                    "area": float(mask.float().mean())})
    return out
