"""A word-level tokenizer and a tiny CLIP-like text encoder (the embedded miniature SD's).

A model folder whose ``text_encoder/config.json`` has ``"_class_name": "WordTextEncoder"`` is
loaded with these classes by ``core/backends/loading.py`` (no transformers needed); the vocabulary
is ``tokenizer/vocab.json``.
"""
from __future__ import annotations

import re

import torch
from torch import nn

BOS, EOS, PAD, UNK = "<bos>", "<eos>", "<pad>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
DEFAULT_CONTEXT_LENGTH = 32


class WordTokenizer:
    """Lower-cases, splits on non-letters, and maps words to ids in a fixed vocabulary.

    Like CLIP: ``[BOS, w1, .., wn, EOS, EOS, ...]`` padded to ``context_length`` with EOS, and
    truncated so that the last token kept before padding is always EOS. Unknown words map to UNK.
    """

    def __init__(self, words: tuple[str, ...] = (),
                 context_length: int = DEFAULT_CONTEXT_LENGTH) -> None:
        self.vocab: tuple[str, ...] = SPECIAL_TOKENS + tuple(w for w in words if w not in SPECIAL_TOKENS)
        self.index: dict[str, int] = {w: i for i, w in enumerate(self.vocab)}
        self.context_length = int(context_length)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def bos_id(self) -> int:
        return self.index[BOS]

    @property
    def eos_id(self) -> int:
        return self.index[EOS]

    @staticmethod
    def words(text: str) -> list[str]:
        return re.findall(r"[a-z]+", text.lower())

    def tokenize(self, text: str) -> tuple[torch.Tensor, list[str]]:
        """Returns ``ids`` LongTensor ``[context_length]`` and the token string at every position."""
        words = self.words(text)[: self.context_length - 2]
        tokens = [BOS] + [w if w in self.index else UNK for w in words] + [EOS]
        tokens += [EOS] * (self.context_length - len(tokens))
        ids = torch.tensor([self.index[t] for t in tokens], dtype=torch.int64)
        return ids, tokens

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """Batch of ids ``[B, context_length]`` (a single string gives ``B = 1``)."""
        if isinstance(texts, str):
            texts = [texts]
        return torch.stack([self.tokenize(t)[0] for t in texts])

    def to_config(self) -> dict:
        return {"vocab": list(self.vocab), "context_length": self.context_length}

    @classmethod
    def from_config(cls, config: dict) -> "WordTokenizer":
        vocab = tuple(config["vocab"])
        if vocab[: len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
            raise ValueError("tokenizer vocab must start with the special tokens " + repr(SPECIAL_TOKENS))
        tok = cls(vocab[len(SPECIAL_TOKENS):], int(config["context_length"]))
        if tok.vocab != vocab:
            raise ValueError("tokenizer vocab has duplicate words")
        return tok


class TinyTextEncoder(nn.Module):
    """Token + learned position embeddings, causal pre-norm transformer layers, final LayerNorm
    (CLIP text-tower layout). ``forward(ids [B,L]) -> [B,L,width]``; the width equals the UNet's
    ``cross_attention_dim``."""

    def __init__(self, vocab_size: int, width: int = 64, layers: int = 2, heads: int = 4,
                 context_length: int = DEFAULT_CONTEXT_LENGTH) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Parameter(torch.zeros(context_length, width))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.01)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(layers))
        self.final_norm = nn.LayerNorm(width)
        mask = torch.triu(torch.full((context_length, context_length), float("-inf")), diagonal=1)
        self.register_buffer("causal_mask", mask, persistent=False)

    @property
    def width(self) -> int:
        return int(self.token_embedding.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        x = self.token_embedding(ids) + self.position_embedding[:length]
        mask = self.causal_mask[:length, :length]
        for layer in self.layers:
            x = layer(x, src_mask=mask, is_causal=True)
        return self.final_norm(x)
