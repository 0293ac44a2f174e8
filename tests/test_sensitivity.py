"""Sensitivity: plausible DiffSeg capture bugs must fail an assertion (or move the score).

Each "bug" is planted by monkeypatching or wrapping (never by editing core):

* a resolution dropped (``strides=``),
* query and key transposed (the aggregate transposed; or the captured probabilities computed as
  ``softmax(K Q^T)`` while the forward stays correct),
* head averaging skipped (one head only) or replaced by a sum,
* wrong resolution weights (uniform, or inverted),
* ``align_corners=True`` in the key-side upsampling (a known port mistake).

The checks that must catch them are in :func:`check_capture`: every self-attention resolution of
the model is aggregated, rows sum to 1, and the aggregate equals an independent re-statement
(forward hooks on the UNet's own attention modules, explicit float64 softmax per head, official
``aggregate_weights`` steps). The row-sum check is made asymmetric on purpose: the test asserts that
the true aggregate's *columns* do not sum to 1, so a transposed aggregate cannot pass it.

The checks run on a freshly initialised miniature SD (random heads differ from each other).
``test_bugs_move_the_score`` also shows, on the embedded trained model, that each bug changes
DiffSeg's labels and score on held-out scenes (a transposed aggregate is
already refused by ``kl_merge``'s row-sum validation, which counts as caught).
"""
from __future__ import annotations

import dataclasses
import math
import types

import pytest
import torch
import torch.nn.functional as F

from emergent_seg.core import capture as capture_mod
from emergent_seg.core import pipeline
from emergent_seg.core.capture import AttentionCapture
from emergent_seg.core.errors import EmergentSegError
from emergent_seg.core.metrics import score_instances
from emergent_seg.core.sites import select, strides_of
from emergent_seg.fixture.scenes import EVAL_SEED, make_scenes


SIZE = 256  # the embedded model's native size: attention at 32, 16, 8 and the 4x4 mid block


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    from mini_sd import save_random_mini_sd

    from emergent_seg.core.backends.loading import load_backend

    return load_backend(save_random_mini_sd(tmp_path_factory.mktemp("random_mini_sd"), seed=1234))


@pytest.fixture(scope="module")
def images():
    return torch.stack([s.image for s in make_scenes(2, EVAL_SEED + 7, SIZE)])


# ---------------------------------------------------------------------------------------------
# the checks
# ---------------------------------------------------------------------------------------------

def reference_aggregate(backend, images: torch.Tensor, timestep: int = 300) -> torch.Tensor:
    """Independent DiffSeg aggregate ``[B, N, N]`` float64 (DiffSeg's aggregation, restated)."""
    latents = backend.encode(images)
    cond = backend.empty_conditioning().expand(latents.shape[0])
    inputs: dict[str, torch.Tensor] = {}
    handles = []
    sites = select(backend.sites(), kind="self")
    for site in sites:
        module = backend._modules[site.key]
        handles.append(module.register_forward_hook(
            lambda m, args, kwargs, out, key=site.key: inputs.__setitem__(
                key, args[0] if args else kwargs["hidden_states"]), with_kwargs=True))
    try:
        with torch.no_grad():
            backend.unet(latents, torch.full((latents.shape[0],), timestep), encoder_hidden_states=cond.context)
    finally:
        for h in handles:
            h.remove()
    hw = tuple(latents.shape[-2:])
    per_stride: dict[int, list[torch.Tensor]] = {}
    for site in sites:
        module = backend._modules[site.key]
        x = inputs[site.key].double()
        q = F.linear(x, module.to_q.weight.double())
        k = F.linear(x, module.to_k.weight.double())
        b, n, c = q.shape
        d = c // site.heads
        qh = q.view(b, n, site.heads, d).transpose(1, 2)
        kh = k.view(b, n, site.heads, d).transpose(1, 2)
        probs = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)
        per_stride.setdefault(site.stride, []).append(probs.mean(dim=1))
    top = min(per_stride)
    th, tw = hw[0] // top, hw[1] // top
    sides = {s: hw[0] // s for s in per_stride}
    out = torch.zeros(latents.shape[0], th * tw, th * tw, dtype=torch.float64)
    for s, maps in per_stride.items():
        m = torch.stack(maps).mean(0)
        rh, rw = hw[0] // s, hw[1] // s
        keys = F.interpolate(m.reshape(-1, 1, rh, rw), size=(th, tw), mode="bilinear", align_corners=False)
        keys = keys / keys.sum(dim=(-1, -2), keepdim=True)
        keys = keys.reshape(-1, rh, rw, th * tw)
        keys = keys.repeat_interleave(th // rh, dim=1).repeat_interleave(tw // rw, dim=2)
        out += sides[s] / sum(sides.values()) * keys.reshape(-1, th * tw, th * tw)
    return out


def check_capture(backend, cap: AttentionCapture, reference: torch.Tensor) -> None:
    """Assertions a correct capture passes; each planted bug must fail at least one."""
    a = cap.self_attention.double()
    want = set(strides_of(backend.sites(), "self"))
    got = {level.stride for level in cap.levels}
    assert got == want, f"aggregated resolutions {sorted(got)} != model's {sorted(want)}"
    assert a.shape == reference.shape, f"aggregate {tuple(a.shape)} != reference {tuple(reference.shape)}"
    rows = a.sum(-1)
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-4), \
        f"rows must sum to 1 (max dev {float((rows - 1).abs().max()):.3g})"
    diff = float((a - reference).abs().max())
    assert diff < 1e-6, f"aggregate differs from the independent re-statement by {diff:.3g}"


@pytest.fixture(scope="module")
def reference(backend, images):
    return reference_aggregate(backend, images)


def _capture(backend, images, **settings):
    return pipeline.capture(backend, images, settings=pipeline.DiffSegSettings(**settings))


def test_correct_capture_passes_and_checks_are_discriminative(backend, images, reference):
    cap = _capture(backend, images)
    check_capture(backend, cap, reference)
    # asymmetry: columns of the true aggregate do NOT sum to 1, so a transposed one fails the
    # row check; per-head maps differ, so a one-head capture cannot match the head mean.
    cols = reference.sum(1)
    assert float((cols - 1).abs().max()) > 0.05
    assert float((reference - reference.transpose(1, 2)).abs().max()) > 100 * 1e-6  # >> the check's tolerance


# ---------------------------------------------------------------------------------------------
# the planted bugs
# ---------------------------------------------------------------------------------------------

def _bug_drop_coarsest(monkeypatch, backend):
    strides = strides_of(backend.sites(), "self")
    return {"strides": tuple(strides[:-1])}


def _bug_drop_finest(monkeypatch, backend):
    strides = strides_of(backend.sites(), "self")
    return {"strides": tuple(strides[1:])}


def _bug_transposed_aggregate(monkeypatch, backend):
    real = pipeline.capture_attention

    def wrapped(*args, **kwargs):
        cap = real(*args, **kwargs)
        return dataclasses.replace(cap, self_attention=cap.self_attention.transpose(1, 2).contiguous())
    monkeypatch.setattr(pipeline, "capture_attention", wrapped)
    return {}


def _bug_swapped_qk_probs(monkeypatch, backend):
    real = capture_mod.attention_with_head_mean

    def wrapped(q, k, v, heads, target, weight=1.0, budget_bytes=capture_mod.DEFAULT_CHUNK_BYTES):
        out = real(q, k, v, heads, torch.zeros_like(target), weight, budget_bytes)
        # capture sees softmax(K Q^T) for self-attention: rows still sum to 1
        real(*((k, q) if q.shape == k.shape else (q, k)), v, heads, target, weight, budget_bytes)
        return out
    monkeypatch.setattr(capture_mod, "attention_with_head_mean", wrapped)
    return {}


def _bug_one_head(monkeypatch, backend):
    real = capture_mod.attention_with_head_mean

    def wrapped(q, k, v, heads, target, weight=1.0, budget_bytes=capture_mod.DEFAULT_CHUNK_BYTES):
        out = real(q, k, v, heads, torch.zeros_like(target), weight, budget_bytes)
        d = q.shape[-1] // heads
        real(q[..., :d], k[..., :d], v[..., :d], 1, target, weight, budget_bytes)
        return out
    monkeypatch.setattr(capture_mod, "attention_with_head_mean", wrapped)
    return {}


def _bug_head_sum(monkeypatch, backend):
    real = capture_mod.attention_with_head_mean
    monkeypatch.setattr(capture_mod, "attention_with_head_mean",
                        lambda q, k, v, heads, target, weight=1.0, budget_bytes=capture_mod.DEFAULT_CHUNK_BYTES:
                        real(q, k, v, heads, target, weight * heads, budget_bytes))
    return {}


def _bug_uniform_weights(monkeypatch, backend):
    monkeypatch.setattr(capture_mod, "proportional_weights", lambda strides: {s: 1.0 / len(list(strides)) for s in strides})
    return {}


def _bug_inverted_weights(monkeypatch, backend):
    def inverted(strides):
        strides = list(strides)
        total = sum(strides)
        return {s: s / total for s in strides}  # coarse levels weigh most: backwards
    monkeypatch.setattr(capture_mod, "proportional_weights", inverted)
    return {}


def _bug_align_corners(monkeypatch, backend):
    def interpolate(*args, **kwargs):
        if kwargs.get("mode") == "bilinear":
            kwargs["align_corners"] = True
        return F.interpolate(*args, **kwargs)
    monkeypatch.setattr(capture_mod, "F", types.SimpleNamespace(interpolate=interpolate))
    return {}


BUGS = {
    "drop-coarsest-resolution": _bug_drop_coarsest,
    "drop-finest-resolution": _bug_drop_finest,
    "transposed-aggregate": _bug_transposed_aggregate,
    "swapped-query-key": _bug_swapped_qk_probs,
    "one-head": _bug_one_head,
    "head-sum": _bug_head_sum,
    "uniform-weights": _bug_uniform_weights,
    "inverted-weights": _bug_inverted_weights,
    "align-corners": _bug_align_corners,
}


@pytest.mark.parametrize("bug", list(BUGS))
def test_bug_fails_a_check(bug, backend, images, reference, monkeypatch):
    settings = BUGS[bug](monkeypatch, backend)
    cap = _capture(backend, images, **settings)
    with pytest.raises(AssertionError):
        check_capture(backend, cap, reference)


def test_dropped_resolution_changes_the_numbers_not_only_the_metadata(backend, images, reference, monkeypatch):
    cap = _capture(backend, images, **_bug_drop_coarsest(monkeypatch, backend))
    # the coarsest level weighs 1/7 here; its absence is still far outside the 1e-6 tolerance
    assert float((cap.self_attention.double() - reference).abs().max()) > 10 * 1e-6


def test_transposed_aggregate_is_caught_by_the_row_check_alone(backend, images, monkeypatch):
    _bug_transposed_aggregate(monkeypatch, backend)
    a = _capture(backend, images).self_attention.double()
    rows = a.sum(-1)
    assert float((rows - 1).abs().max()) > 0.05  # the row-sum assertion alone fails


# ---------------------------------------------------------------------------------------------
# the score moves (trained model only)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained():
    from emergent_seg.core.backends.loading import load_backend
    return load_backend(None)


def _score(backend, scenes, settings) -> tuple[float, torch.Tensor]:
    images = torch.stack([s.image for s in scenes])
    seg = pipeline.segment_diffseg(backend, images, settings=settings)
    return score_instances(seg.labels, torch.stack([s.labels for s in scenes]))["miou"], seg.labels


SCORE_BUGS = ["drop-finest-resolution", "transposed-aggregate", "swapped-query-key", "one-head",
              "inverted-weights"]


@pytest.mark.parametrize("bug", SCORE_BUGS)
def test_bugs_move_the_score(bug, trained, monkeypatch):
    from emergent_seg.evaluation import diffseg_settings

    scenes = make_scenes(8, EVAL_SEED + 500, SIZE)
    settings = diffseg_settings(trained)
    good, good_labels = _score(trained, scenes, settings)
    extra = BUGS[bug](monkeypatch, trained)
    try:
        bad, bad_labels = _score(trained, scenes, dataclasses.replace(settings, **extra))
    except EmergentSegError as exc:  # the merge's own input validation caught it: also a pass
        assert "row" in str(exc), exc
        return
    print(f"{bug}: instance mIoU {good:.3f} -> {bad:.3f}")
    changed = float((good_labels != bad_labels).float().mean()) if good_labels.shape == bad_labels.shape else 1.0
    assert changed > 0.01, f"{bug}: labels changed on only {changed:.1%} of pixels"
    assert bad != good, f"{bug}: score unchanged ({good:.3f})"
