"""Map prompt words to the text-encoder token positions they occupy (for semantic labels).

The official DiffSeg demo takes a noun's token index as ``word_index + 1`` (skip BOS). That
assumes one CLIP token per word; multi-token words ("skateboard" -> "skate", "board"),
punctuation and digits (CLIP splits "2024" into four tokens) shift every later index. Here each
prompt word is aligned, character by character, with the token strings the tokenizer actually
produced, so a word maps to *all* its positions.

Token strings follow the CLIP BPE convention (``"board</w>"`` ends a word, ``<|startoftext|>`` and
``<|endoftext|>`` are special), but alignment only needs each token's text, so other tokenizers
work when their token strings spell the text (SentencePiece's ``"▁"`` word marker is stripped).

No part-of-speech tagger is used (nltk would be a heavy dependency): :func:`label_words` keeps
every prompt word except a small list of English stopwords and words without letters. For a
caption such as "a photo of a dog on the grass" that leaves photo, dog, grass.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from .errors import EmergentSegError

#: Special tokens that never belong to a word.
SPECIAL_TOKENS = frozenset({"<|startoftext|>", "<|endoftext|>", "<s>", "</s>", "<pad>", "<unk>",
                            "[CLS]", "[SEP]", "[PAD]"})

#: Closed-class English words dropped by :func:`label_words`: articles, prepositions, pronouns,
#: auxiliaries, conjunctions. Content words ("photo", "red") are kept; they cost a vote at most.
STOPWORDS = frozenset("""
a an the this that these those there here some any each every no not
of in on at to from by with without for into onto over under above below between behind beside
near through across around along among against up down off out about after before during while
and or but nor so yet as if than then also very too just only
i me my mine we us our you your he him his she her it its they them their what which who whom whose
is are was were be been being am do does did has have had having can could will would shall should
may might must
""".split())

_WEIGHT = re.compile(r":\s*[-+]?(?:\d+\.?\d*|\.\d+)\s*(?=\))")
_EMBEDDING = re.compile(r"embedding:\S+", re.IGNORECASE)
_EDGE_PUNCT = re.compile(r"^[^\w]+|[^\w]+$")


def _token_text(token: str | None) -> tuple[str, bool]:
    """``(text, ends_word)`` of one token string; special or unknown tokens give ``("", True)``."""
    if token is None or token in SPECIAL_TOKENS:
        return "", True
    ends = token.endswith("</w>")
    text = token[:-4] if ends else token
    text = text.replace("\u2581", "")  # SentencePiece word marker
    return text.lower(), ends


def _content_positions(tokens: Sequence[str | None]) -> list[int]:
    """Positions of real text tokens: between each ``<|startoftext|>`` and the next
    ``<|endoftext|>`` (padding after the end token is skipped); every non-special position when
    the sequence has no start token."""
    if "<|startoftext|>" not in tokens:
        return [i for i, t in enumerate(tokens) if t is not None and t not in SPECIAL_TOKENS]
    out, inside = [], False
    for i, t in enumerate(tokens):
        if t == "<|startoftext|>":
            inside = True
        elif t == "<|endoftext|>":
            inside = False
        elif inside and t is not None and t not in SPECIAL_TOKENS:
            out.append(i)
    return out


def clean_prompt(prompt: str) -> str:
    """Remove ComfyUI prompt syntax the tokenizer never sees: ``(word:1.2)`` weights, unescaped
    brackets and ``embedding:name`` references; ``\\(`` escapes become plain brackets."""
    text = _EMBEDDING.sub(" ", prompt)
    text = _WEIGHT.sub("", text)
    text = text.replace("\\(", "\x00").replace("\\)", "\x01")
    text = text.replace("(", " ").replace(")", " ")
    return text.replace("\x00", "(").replace("\x01", ")")


def prompt_words(prompt: str) -> list[str]:
    """The words of a prompt as a user reads them: whitespace-separated, lower-case, with
    leading/trailing punctuation removed ("Dog," -> "dog"; "t-shirt" stays one word)."""
    words = []
    for raw in clean_prompt(prompt).split():
        w = _EDGE_PUNCT.sub("", raw.lower())
        if w:
            words.append(w)
    return words


def _grouped_words(tokens: Sequence[str | None]) -> dict[str, list[int]]:
    """Without a prompt: join tokens into words at ``</w>`` (or SentencePiece ``▁``) boundaries."""
    out: dict[str, list[int]] = {}
    text, positions = "", []

    def flush() -> None:
        nonlocal text, positions
        word = _EDGE_PUNCT.sub("", text)
        if word:
            out.setdefault(word, [])
            out[word] = sorted(set(out[word]) | set(positions))
        text, positions = "", []

    for i in _content_positions(tokens):
        raw = tokens[i] or ""
        if raw.startswith("\u2581") and text:
            flush()
        piece, ends = _token_text(raw)
        text += piece
        positions.append(i)
        if ends:
            flush()
    flush()
    return out


def word_positions(tokens: Sequence[str | None], prompt: str | None = None) -> dict[str, list[int]]:
    """Map every prompt word to all token positions it occupies.

    Args:
        tokens: the token string at each position of the conditioning (``None`` for positions
            without a string, e.g. textual-inversion embeddings). Long prompts span several
            77-token chunks; positions index the concatenation, as the context does.
        prompt: the text that was tokenized. When given, its whitespace-separated words are
            aligned in order with the token text, so words the tokenizer split (multi-token words,
            hyphens, digits) get all their positions; words it never saw are left out. When
            ``None``, words are rebuilt from the token strings' end-of-word markers.

    Returns:
        ``{word: sorted positions}`` in order of first appearance; a repeated word gets the
        positions of every occurrence.
    """
    if prompt is None:
        return _grouped_words(tokens)
    chars: list[str] = []
    owner: list[int] = []
    for i in _content_positions(tokens):
        text, _ = _token_text(tokens[i])
        text = "".join(text.split())
        chars.extend(text)
        owner.extend([i] * len(text))
    stream = "".join(chars)
    out: dict[str, list[int]] = {}
    cursor = 0
    for word in prompt_words(prompt):
        needle = "".join(word.split())
        at = stream.find(needle, cursor)
        if at < 0:
            continue
        positions = sorted(set(owner[at:at + len(needle)]))
        out[word] = sorted(set(out.get(word, [])) | set(positions))
        cursor = at + len(needle)
    return out


def is_label_word(word: str, stopwords: Iterable[str] = STOPWORDS) -> bool:
    """True for words worth naming a segment after: has a letter and is not a stopword."""
    return any(c.isalpha() for c in word) and word not in set(stopwords)


def label_words(tokens: Sequence[str | None], prompt: str | None = None,
                stopwords: Iterable[str] = STOPWORDS) -> dict[str, list[int]]:
    """:func:`word_positions` restricted to candidate labels (DiffSeg keeps NLTK nouns; this pack
    keeps every word that is not a stopword and contains a letter)."""
    stop = set(stopwords)
    return {w: p for w, p in word_positions(tokens, prompt).items() if is_label_word(w, stop)}



def word_maps(cross: Sequence, words: dict[str, list[int]], size: tuple[int, int]) -> torch.Tensor:
    """DiffSeg's ``aggregate_x_weights`` restricted to the chosen words.

    Args:
        cross: cross-attention levels, each with ``grid`` ``(h, w)`` and ``maps`` ``[B, h*w, T]``
            (head- and layer-averaged probabilities; :class:`core.capture.CrossAttentionLevel`).
        words: ``{word: token positions}`` (:func:`label_words`).
        size: output ``(H, W)``.

    Returns:
        ``[B, len(words), H, W]``: per level, every token map bilinearly upsampled
        (``align_corners=False``) and renormalised over all T tokens at each pixel, summed over
        levels with weight 1 each (the official ``weight_ratio=[1,1,1,1]``); a multi-token word is
        the mean of its tokens' maps. (The official 64x64 level's ``/3`` quirk is not reproduced.)
    """
    if not cross:
        raise EmergentSegError("no cross-attention was captured; give Capture Attention a prompt")
    b = cross[0].maps.shape[0]
    out = torch.zeros(b, len(words), *size, dtype=torch.float32, device=cross[0].maps.device)
    for level in cross:
        h, w = level.grid
        maps = level.maps.float()
        n_tok = maps.shape[-1]
        total = F.interpolate(maps.sum(-1).view(b, 1, h, w), size=size, mode="bilinear",
                              align_corners=False)
        for j, positions in enumerate(words.values()):
            idx = [p for p in positions if p < n_tok]
            if not idx:
                continue
            word = maps[..., idx].mean(-1).view(b, 1, h, w)
            up = F.interpolate(word, size=size, mode="bilinear", align_corners=False)
            out[:, j] += (up / total.clamp_min(1e-12))[:, 0]
    return out


def vote_words(labels: torch.Tensor, counts: Sequence[int], cross: Sequence,
               words: dict[str, list[int]]) -> list[list[str | None]]:
    """DiffSeg's ``get_semantics`` with ``voting="mean"`` (the notebook's choice): every word map
    is L2-normalised over the image's pixels, each segment takes the mean of every word map over
    its pixels, and the segment is named after the word with the largest mean.

    Args:
        labels: ``[B, H, W]`` int64, image ``b`` using ``0..counts[b]-1``.
        counts: segments per image.
        cross: the capture's cross-attention levels (see :func:`word_maps`).
        words: candidate words with their token positions; empty -> every segment gets ``None``.

    Returns:
        Per image, one word (or ``None``) per segment.
    """
    if not words:
        return [[None] * int(n) for n in counts]
    names = list(words)
    maps = word_maps(cross, words, (int(labels.shape[1]), int(labels.shape[2])))
    out: list[list[str | None]] = []
    for b, n in enumerate(counts):
        m = maps[b].flatten(1)                                   # [W, HW]
        m = m / m.norm(dim=1, keepdim=True).clamp_min(1e-12)
        lab = labels[b].reshape(-1).to(m.device)
        sums = torch.zeros(len(names), int(n), dtype=m.dtype, device=m.device)
        sums.index_add_(1, lab, m)
        area = torch.bincount(lab, minlength=int(n)).clamp_min(1).to(m.dtype)
        best = (sums / area).argmax(dim=0)
        out.append([names[int(i)] for i in best])
    return out
