"""Prompt word -> token position mapping (core/words.py), with a fake CLIP-style tokenizer."""
import re

import pytest
import torch

from emergent_seg.core.errors import EmergentSegError
from emergent_seg.core.words import (clean_prompt, label_words, prompt_words, vote_words, word_maps,
                                     word_positions)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# A fake BPE vocabulary: these words split into several pieces, as CLIP's would.
SPLITS = {"skateboard": ["skate", "board"], "sunflowers": ["sun", "flowers"],
          "giraffe": ["gir", "af", "fe"]}


def fake_clip_tokenize(prompt: str, length: int = 77) -> list[str]:
    """Mimics CLIP: lower-case, pre-tokens = letter runs | single digits | punctuation runs, the
    last piece of each pre-token carries "</w>", BOS/EOS, padded with EOS to ``length``."""
    text = clean_prompt(prompt).lower()
    out = [BOS]
    for pre in re.findall(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+", text):
        pieces = SPLITS.get(pre, [pre])
        out += pieces[:-1] + [pieces[-1] + "</w>"]
    out.append(EOS)
    return out + [EOS] * (length - len(out))


def test_one_token_words_skip_bos():
    toks = fake_clip_tokenize("a dog on grass")
    assert word_positions(toks, "a dog on grass") == {"a": [1], "dog": [2], "on": [3], "grass": [4]}


def test_multi_token_word_gets_all_positions_and_later_words_are_not_shifted():
    prompt = "a skateboard and a giraffe"
    toks = fake_clip_tokenize(prompt)
    got = word_positions(toks, prompt)
    assert got["skateboard"] == [2, 3]
    assert got["giraffe"] == [6, 7, 8]
    # The official word_index + 1 shortcut would point "giraffe" (word 4) at position 5 ("a").
    assert toks[5] == "a</w>"


def test_punctuation_digits_and_hyphens():
    prompt = "Dog, cat; a t-shirt in 2024."
    toks = fake_clip_tokenize(prompt)
    got = word_positions(toks, prompt)
    assert got["dog"] == [1]          # "," is its own token (2) and belongs to no word
    assert got["cat"] == [3]
    assert [toks[i] for i in got["t-shirt"]] == ["t</w>", "-</w>", "shirt</w>"]
    assert [toks[i] for i in got["2024"]] == ["2</w>", "0</w>", "2</w>", "4</w>"]


def test_repeated_word_collects_every_occurrence():
    prompt = "dog and dog"
    got = word_positions(fake_clip_tokenize(prompt), prompt)
    assert got["dog"] == [1, 3]


def test_padding_and_second_chunk():
    first = fake_clip_tokenize("a red car")
    second = fake_clip_tokenize("blue sunflowers")
    got = word_positions(first + second, "a red car blue sunflowers")
    assert got["car"] == [3]
    assert got["blue"] == [77 + 1]
    assert got["sunflowers"] == [77 + 2, 77 + 3]


def test_comfy_weight_syntax_and_escapes():
    prompt = "(red car:1.3) near a \\(tree\\)"
    toks = fake_clip_tokenize(prompt)
    got = word_positions(toks, prompt)
    assert "1.3" not in got and "car:1.3" not in got
    assert got["car"] == [2]
    assert [toks[i] for i in got["tree"]] == ["tree</w>"]
    assert prompt_words(prompt) == ["red", "car", "near", "a", "tree"]


def test_unknown_positions_and_unaligned_words_are_skipped():
    toks = [BOS, None, "cat</w>", EOS]                 # None: a textual-inversion embedding
    assert word_positions(toks, "embedding:foo cat") == {"cat": [2]}
    assert word_positions(toks, "zebra cat") == {"cat": [2]}


def test_without_prompt_groups_by_end_of_word_markers():
    toks = fake_clip_tokenize("a skateboard, sunflowers")
    assert word_positions(toks) == {"a": [1], "skateboard": [2, 3], "sunflowers": [5, 6]}


def test_sentencepiece_markers():
    toks = ["\u2581a", "\u2581sky", "scraper", "</s>"]
    assert word_positions(toks) == {"a": [0], "skyscraper": [1, 2]}
    assert word_positions(toks, "a skyscraper") == {"a": [0], "skyscraper": [1, 2]}


def test_label_words_drop_stopwords_and_non_words():
    prompt = "a photo of the giraffe, on 2 skateboards"
    got = label_words(fake_clip_tokenize(prompt), prompt)
    assert list(got) == ["photo", "giraffe", "skateboards"]
    assert got["giraffe"] == [5, 6, 7]


def test_empty_prompt_has_no_words():
    assert word_positions(fake_clip_tokenize(""), "") == {}
    assert label_words(fake_clip_tokenize("")) == {}


# ------------------------------------------------------------------------------- word voting

class _Level:
    def __init__(self, grid, maps):
        self.grid, self.maps = grid, maps


def _cross(h=4, w=4, tokens=8, batch=1):
    """Left half attends to token 2 ("cat"), right half to tokens 4-5 ("skate", "board")."""
    maps = torch.full((batch, h * w, tokens), 0.01)
    for y in range(h):
        for x in range(w):
            if x < w // 2:
                maps[:, y * w + x, 2] = 1.0
            else:
                maps[:, y * w + x, 4] = 0.5
                maps[:, y * w + x, 5] = 0.5
    return maps / maps.sum(-1, keepdim=True)


def test_vote_words_mean_voting_with_multi_token_word():
    labels = torch.zeros(1, 16, 16, dtype=torch.long)
    labels[:, :, 8:] = 1
    words = {"cat": [2], "skateboard": [4, 5], "sky": [7]}
    levels = [_Level((4, 4), _cross()), _Level((2, 2), _cross(2, 2))]
    assert vote_words(labels, [2], levels, words) == [["cat", "skateboard"]]


def test_vote_words_batch_with_different_counts_and_no_words():
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[:, :, 4:] = 1
    labels[0, 4:, 4:] = 2                                  # image 0: 3 segments, image 1: 2
    levels = [_Level((4, 4), _cross(batch=2))]
    words = {"cat": [2], "skateboard": [4, 5]}
    assert vote_words(labels, [3, 2], levels, words) == \
        [["cat", "skateboard", "skateboard"], ["cat", "skateboard"]]
    assert vote_words(labels, [3, 2], levels, {}) == [[None, None, None], [None, None]]


def test_word_maps_renormalise_over_tokens_and_sum_levels():
    levels = [_Level((4, 4), _cross()), _Level((4, 4), _cross())]
    maps = word_maps(levels, {"cat": [2]}, (4, 4))
    single = word_maps(levels[:1], {"cat": [2]}, (4, 4))
    torch.testing.assert_close(maps, 2 * single)
    assert maps.shape == (1, 1, 4, 4)
    assert float(single.max()) <= 1.0 + 1e-6


def test_word_maps_needs_cross_attention():
    with pytest.raises(EmergentSegError, match="prompt"):
        word_maps([], {"cat": [2]}, (4, 4))
