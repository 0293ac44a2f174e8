"""The one-call Python API (api.py): inputs of every kind, results at the image's own size, and
bad options refused before any model work."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

import emergent_seg
from emergent_seg import api
from emergent_seg.core.backends.loading import load_backend
from emergent_seg.core.errors import EmergentSegError

CAT = str(Path(__file__).resolve().parents[1] / "fixture" / "photos" / "cat.jpg")


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


def test_a_size_over_the_memory_budget_runs_smaller_with_a_warning(backend):
    from emergent_seg.core.images import attention_bytes, fit_memory

    need = attention_bytes(backend, 512, 768)
    assert attention_bytes(backend, 1024, 1536) == 16 * need           # the square of the pixel count
    h, w = fit_memory(backend, 512, 768, budget=need // 10)
    assert (h, w) < (512, 768) and h % 64 == 0 and w % 64 == 0
    assert attention_bytes(backend, h, w) <= need // 10
    assert fit_memory(backend, 512, 768, budget=need) == (512, 768)
    assert fit_memory(backend, 512, 768, budget=0) == (512, 768)       # 0 = no limit
    image = torch.rand(3, 128, 192)
    budget_gb = attention_bytes(backend, 64, 128) / 1024 ** 3
    with pytest.warns(UserWarning, match="instead of 192x128") as caught:
        result = emergent_seg.segment(image, backend, size="keep", max_memory_gb=budget_gb)
    assert "\n" not in str(caught[0].message)
    assert result.labels.shape == (128, 192)                           # still the image's size
    h, w = result.segmentation.size
    assert h < 128 and w < 192 and h % 64 == 0 and w % 64 == 0
    assert attention_bytes(backend, h, w) <= budget_gb * 1024 ** 3


def test_cli_warns_and_downscales_past_max_memory(backend, tmp_path, capsys):
    from PIL import Image

    from emergent_seg import cli
    from emergent_seg.core.images import attention_bytes

    path = tmp_path / "wide.png"
    Image.fromarray((np.random.default_rng(0).random((128, 192, 3)) * 255).astype(np.uint8)).save(path)
    budget_gb = attention_bytes(backend, 64, 128) / 1024 ** 3
    assert cli.main(["segment", str(path), "--size", "keep", "--max-memory", repr(budget_gb), "--out",
                     str(tmp_path / "out"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning: wide: running at " in err and "instead of 192x128" in err and err.count("\n") == 1
    assert np.asarray(Image.open(tmp_path / "out" / "wide_labels.png")).shape == (128, 192)
    assert cli.main(["segment", str(path), "--max-memory", "-1", "--out", str(tmp_path / "o2")]) == 2
    assert "--max-memory must be >= 0" in capsys.readouterr().err


def test_a_prompt_names_the_segments_after_its_words(backend):
    result = emergent_seg.segment(CAT, backend, prompt="a cat on grass")
    assert len(result.words) == result.count >= 1
    assert set(result.words) <= {"cat", "grass"} and any(w is not None for w in result.words)
    plain = emergent_seg.segment(CAT, backend)
    assert plain.words == (None,) * plain.count
