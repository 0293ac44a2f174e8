"""The nodes on a full-size SD1.5 checkpoint (random weights, built once into the cache) at 256 px.

Gated on COMFYUI_PATH. CPU cost: one checkpoint load, two UNet passes for the capture checks and
two one-step KSampler runs (cond + uncond) for the bit-identity check.
"""
import comfy_support as cs

cs.require_comfy()

import pytest  # noqa: E402
import torch  # noqa: E402


from emergent_seg.core.words import label_words  # noqa: E402
from emergent_seg.nodes import capture as capture_node  # noqa: E402
from emergent_seg.nodes import kl_merge as kl_node  # noqa: E402
from emergent_seg.nodes import mask_output as mask_node  # noqa: E402
from emergent_seg.nodes.comfy_backend import ComfyBackend  # noqa: E402

SIZE = 256
PROMPT = "a red skateboard, on green grass"


@pytest.fixture(scope="module")
def checkpoint():
    return cs.load_sd15()


def scene(size=SIZE):
    img = torch.zeros(1, size, size, 3)
    img[:, :, : size // 2] = torch.tensor([0.9, 0.1, 0.1])
    img[:, :, size // 2:] = torch.tensor([0.1, 0.8, 0.2])
    return img


def test_checkpoint_is_detected_as_sd15(checkpoint):
    model, clip, vae = checkpoint
    assert type(model.model).__name__ == "BaseModel"
    assert type(model.model.model_config).__name__ == "SD15"
    backend = ComfyBackend(model, vae, clip)
    assert len(backend.sites()) == 32 and backend.size_multiple() == 64


def test_capture_merge_masks_with_prompt_words(checkpoint):
    model, clip, vae = checkpoint
    image = scene()
    latent = {"samples": vae.encode(image)}
    cap = capture_node.run(model, latent=latent, clip=clip, prompt=PROMPT, levels="32").outputs[0]
    assert cap.grid == (32, 32) and cap.image_size == (SIZE, SIZE)
    assert [lvl.layers for lvl in cap.levels] == [5]
    # Tokens from the real CLIP tokenizer; "skateboard" is one or more BPE tokens, all mapped.
    assert cap.tokens[0] == "<|startoftext|>" and cap.tokens[1] == "a</w>" and len(cap.tokens) == 77
    assert [c.grid for c in cap.cross] == [(32, 32)] and cap.cross[0].maps.shape == (1, 1024, 77)
    words = label_words(cap.tokens, cap.prompt)
    assert list(words) == ["red", "skateboard", "green", "grass"]
    assert all(cap.tokens[p].removesuffix("</w>") in w for w, ps in words.items() for p in ps)

    # The captured aggregate equals softmax(q kᵀ/√d) computed independently from the weights.
    context = ComfyBackend(model, vae, clip).encode_prompt(PROMPT).context
    expected = cs.independent_top_level_mean(model, model.model.process_latent_in(latent["samples"]),
                                           context, 300)
    torch.testing.assert_close(cap.self_attention.double(), expected, atol=1e-6, rtol=1e-3)

    seg = kl_node.run(cap).outputs[0]
    assert seg.labels.shape == (1, SIZE, SIZE)
    assert len(seg.words[0]) == seg.counts[0]
    assert set(seg.words[0]) <= {"red", "skateboard", "green", "grass"}
    union, per_segment, overlay = mask_node.run(seg, "all", image=image).outputs
    assert union.shape == (1, SIZE, SIZE) and float(union.min()) == 1.0
    assert per_segment.shape == (seg.counts[0], SIZE, SIZE)
    assert overlay.shape == (1, SIZE, SIZE, 3)


def test_ksampler_is_bit_identical_after_our_nodes(checkpoint):
    model, clip, vae = checkpoint
    sample = cs.ksampler_run(model, clip, SIZE)

    before = sample()
    cap = capture_node.run(model, image=scene(), vae=vae, clip=clip, prompt="").outputs[0]
    assert cap.tokens is None and cap.cross == ()          # blank prompt: DiffSeg's unconditional pass
    seg = kl_node.run(cap, anchors_per_side=8).outputs[0]
    mask_node.run(seg, "largest:1")
    after = sample()
    assert torch.equal(before, after)


def photo(height=700, width=1000):
    """A 1000x700 'photo': a red left part, a green right part, a little texture."""
    img = torch.rand(1, height, width, 3, generator=torch.Generator().manual_seed(0)) * 0.1
    img[:, :, : width // 3] += torch.tensor([0.8, 0.05, 0.05])
    img[:, :, width // 3:] += torch.tensor([0.05, 0.7, 0.1])
    return img.clamp(0, 1)


def test_a_1000x700_image_needs_no_image_scale_node(checkpoint):
    model, clip, vae = checkpoint
    image = photo()
    # run at 704x1024 (the nearest multiples of 64): its 1/16 grid is 44x64
    cap = capture_node.run(model, image=image, vae=vae, clip=clip, levels="44x64").outputs[0]
    assert cap.image_size == (700, 1000) and cap.grid == (44, 64)
    seg = kl_node.run(cap).outputs[0]
    assert seg.labels.shape == (1, 700, 1000)
    union, per_segment, overlay = mask_node.run(seg, "all", image=image).outputs
    assert union.shape == (1, 700, 1000) and union.dtype == torch.float32
    assert per_segment.shape == (seg.counts[0], 700, 1000) and overlay.shape == (1, 700, 1000, 3)
    assert torch.equal(per_segment.sum(0), torch.ones(700, 1000))          # a partition of the image


def test_the_cli_gives_1000x700_outputs_for_a_1000x700_jpeg_with_an_sd15_single_file(checkpoint, tmp_path):
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    pytest.importorskip("transformers", reason="the [sd] extra (transformers) is needed for SD's CLIP")
    path = tmp_path / "photo.jpg"
    Image.fromarray((photo()[0].numpy() * 255).astype(np.uint8)).save(path, quality=95)
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "emergent_seg", "segment", str(path), "--model",
                          cs.SD15_CHECKPOINT, "--out", str(out), "--quiet", "--device", "cpu"],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    labels = np.asarray(Image.open(out / "photo_labels.png"))
    assert labels.shape == (700, 1000)
    masks = sorted(out.glob("photo_seg*.png"))
    assert len(masks) == int(labels.max()) + 1
    assert all(np.asarray(Image.open(m)).shape == (700, 1000) for m in masks)
    assert np.asarray(Image.open(out / "photo_overlay.png")).shape == (700, 1000, 3)
