"""The one-call Python API (api.py): inputs of every kind, results at the image's own size, and
bad options refused before any model work."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import emergent_seg
from emergent_seg import api
from emergent_seg.core.backends.loading import load_backend
from emergent_seg.core.errors import EmergentSegError


@pytest.fixture(scope="module")
def backend():
    return load_backend(None, "cpu")


def test_as_image_accepts_paths_pil_arrays_and_tensors(tmp_path):
    from PIL import Image

    rgb = (np.arange(5 * 7 * 3) % 256).astype(np.uint8).reshape(5, 7, 3)
    want = torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    for source in (tmp_path / "a.png", str(tmp_path / "a.png"), Image.fromarray(rgb), rgb, want,
                   want.permute(1, 2, 0), want[None], rgb.astype(np.float32) / 255):
        got = api.as_image(source)
        assert got.shape == (3, 5, 7) and got.dtype == torch.float32
        assert torch.allclose(got, want, atol=1e-6), type(source)
    rgba = np.concatenate([rgb, np.full((5, 7, 1), 255, np.uint8)], axis=-1)
    assert torch.allclose(api.as_image(rgba), want, atol=1e-6)       # alpha dropped


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(2, 3, 4, 4), "must be"),
    (torch.zeros(4, 4), "must be"),
    (torch.full((3, 4, 4), 2.0), "in \\[0, 1\\]"),
    (torch.full((3, 4, 4), float("nan")), "finite"),
    ({"not": "an image"}, "cannot read an image"),
])
def test_as_image_refuses_what_is_not_an_image(bad, message):
    with pytest.raises(EmergentSegError, match=message):
        api.as_image(bad)


@pytest.mark.parametrize("options, message", [
    ({"tau": -1.0}, "tau must be > 0"),
    ({"quality": "paper"}, "unknown quality"),
    ({"taux": 1.0}, "unknown option 'taux'"),
    ({"method": "sam"}, "unknown method"),
    ({"refine": "crf"}, "unknown refine"),
    ({"method": "emerdiff", "refine": "kmeans"}, "DiffSeg's refinement"),
    ({"lam": 0.0}, "lambda must be non-zero"),
    ({"size": "huge"}, "size"),
])
def test_bad_options_fail_in_one_line_before_the_model_loads(options, message, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")
    monkeypatch.setattr("emergent_seg.core.backends.loading.load_backend", no_load)
    start = time.perf_counter()
    with pytest.raises(EmergentSegError, match=message) as err:
        emergent_seg.segment(torch.rand(3, 16, 16), **options)
    assert "\n" not in str(err.value) and time.perf_counter() - start < 2.0


def test_segment_returns_everything_at_the_images_own_size(backend):
    image = torch.rand(3, 90, 150, generator=torch.Generator().manual_seed(0))
    image[:, :, 75:] = image[:, :, 75:] * 0.2 + 0.7
    result = emergent_seg.segment(image, backend)
    assert result.labels.shape == (90, 150) and result.labels.dtype == torch.int64
    assert result.count == int(result.labels.max()) + 1 == result.masks.shape[0]
    assert result.masks.shape == (result.count, 90, 150) and result.masks.dtype == torch.float32
    assert torch.equal(result.masks.argmax(0), result.labels) and torch.equal(result.masks.sum(0), torch.ones(90, 150))
    assert result.overlay.shape == (90, 150, 3) and 0 <= float(result.overlay.min()) <= float(result.overlay.max()) <= 1
    assert len(result.words) == result.count
    # the same as the CLI path: the model ran at its grid, the labels resized back nearest
    seg = result.segmentation
    assert seg.size != (90, 150) and seg.size[0] % backend.size_multiple() == 0
    assert torch.equal(api.labels_at(seg, 90, 150), result.labels)
    again = emergent_seg.segment(image, backend)
    assert torch.equal(again.labels, result.labels)                 # deterministic
    coarse = emergent_seg.segment(image, backend, tau=10.0)
    assert coarse.count <= result.count


def test_segment_with_a_fixed_size_returns_the_cropped_size(backend):
    result = emergent_seg.segment(torch.rand(3, 100, 300), backend, size=128)
    assert result.labels.shape == (128, 128) and result.overlay.shape == (128, 128, 3)
