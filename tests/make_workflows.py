"""Writes example_workflows/*.json from the node specs, so widget order and defaults cannot drift.

    python tests/make_workflows.py          # (re)write the JSON files
    python tests/make_workflows.py --check  # exit 1 if a file differs from what would be written

tests/test_workflows.py runs the --check comparison in CI. Thumbnails (.jpg) are made separately
by tests/comfy/test_browser.py (EMERGENT_SEG_THUMBNAILS=1), from real runs in the browser.
"""
from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT_DIR = os.path.join(ROOT, "example_workflows")

if __name__ == "__main__":  # make `emergent_seg` importable as conftest.py does
    sys.path.insert(0, HERE)
    import conftest  # noqa: F401

from workflow_tools import IMPACT, NODE_TYPES, Workflow  # noqa: E402

CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"
CHECKPOINT_MODELS = {"models": [{
    "name": CHECKPOINT,
    "url": "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
           "v1-5-pruned-emaonly-fp16.safetensors?download=true",
    "directory": "checkpoints"}]}
IMAGE = "example.png"        # ships in ComfyUI's input/ folder
SIZE = 512
NOTE_COLOR, NOTE_BG = "#432", "#653"

SELECTION_HELP = (
    "Mask Output: click segments in its preview to add or remove them (the selection text "
    "updates; it is saved with the workflow). You can also type indices (0, 3, 5), ranges (2-4), "
    "all, largest:2, smallest:1, words, and !2 to exclude.")


def _inputs(wf: Workflow, x: float = 0, y: float = 0) -> tuple[int, int, int]:
    """Load Checkpoint, Load Image and Upscale Image (to 512x512, centre crop) at (x, y)."""
    ckpt = wf.node("CheckpointLoaderSimple", (x, y), {"ckpt_name": CHECKPOINT}, size=(315, 98),
                   properties=CHECKPOINT_MODELS)
    image = wf.node("LoadImage", (x, y + 140), {"image": IMAGE}, size=(315, 330))
    scale = wf.node("ImageScale", (x + 345, y + 140),
                    {"upscale_method": "area", "width": SIZE, "height": SIZE, "crop": "center"},
                    size=(270, 130))
    wf.link(image, "IMAGE", scale, "image")
    return ckpt, image, scale


def _note(wf: Workflow, pos: tuple[float, float], text: str, size: tuple[float, float] = (615, 240)) -> int:
    return wf.node("Note", pos, {"text": text}, size=size, color=NOTE_COLOR, bgcolor=NOTE_BG)


def _capture_merge(wf: Workflow, ckpt: int, scale: int, x: float, y: float) -> tuple[int, int]:
    capture = wf.node("EmergentSegCaptureAttention", (x, y),
                      {}, size=(400, 262))
    wf.link(ckpt, "MODEL", capture, "model")
    wf.link(scale, "IMAGE", capture, "image")
    wf.link(ckpt, "VAE", capture, "vae")
    wf.link(ckpt, "CLIP", capture, "clip")
    merge = wf.node("EmergentSegKLMerge", (x, y + 276),
                    {}, size=(400, 200))
    wf.link(capture, "attention", merge, "attention")
    return capture, merge


def _mask_output(wf: Workflow, seg: int, image: int, pos: tuple[float, float], title: str | None = None,
                 **widgets) -> int:
    values = {"selection": "all", "invert": False, "grow": 0, "feather": 0, **widgets}
    node = wf.node("EmergentSegMaskOutput", pos, values, size=(380, 600), title=title)
    wf.link(seg, 0, node, "segmentation")
    wf.link(image, "IMAGE", node, "image")
    return node


def diffseg_segment() -> Workflow:
    wf = Workflow("diffseg_segment")
    ckpt, _image, scale = _inputs(wf)
    _note(wf, (0, 520), (
        "DiffSeg (Tian et al., CVPR 2024) with the checkpoint you already have: no extra model, "
        "no training.\n\n"
        "1. Load any SD1.x checkpoint (SD2.x and SDXL work too) and an image. Upscale Image makes "
        "it 512x512, the size SD1.x was trained at (any size works; use 1024 for SDXL).\n"
        "2. Capture Attention runs the UNet once (t = 300, no noise) and averages its "
        "self-attention. A prompt there (e.g. a caption) names segments after its words.\n"
        "3. KL Merge groups the attention into segments: lower tau = more, smaller segments.\n"
        f"4. {SELECTION_HELP}\n\n"
        "Outputs: mask = union of the selection, segments = one mask per segment, overlay = "
        "numbered colours over the image."))
    _capture, merge = _capture_merge(wf, ckpt, scale, 660, 0)
    out = _mask_output(wf, merge, scale, (1100, 0))
    overlay = wf.node("PreviewImage", (1520, 0), size=(320, 360), title="Preview Image (overlay)")
    wf.link(out, "overlay", overlay, "images")
    mask = wf.node("MaskPreview", (1520, 400), size=(320, 360), title="Mask Preview (selection)")
    wf.link(out, "mask", mask, "mask")
    to_image = wf.node("MaskToImage", (1880, 0), size=(240, 26))
    wf.link(out, "segments", to_image, "mask")
    segments = wf.node("PreviewImage", (1880, 80), size=(320, 360), title="Preview Image (each segment)")
    wf.link(to_image, "IMAGE", segments, "images")
    return wf


def emerdiff_segment() -> Workflow:
    wf = Workflow("emerdiff_segment")
    ckpt, _image, scale = _inputs(wf)
    _note(wf, (0, 520), (
        "EmerDiff (Namekata et al., ICLR 2024) with the checkpoint you already have.\n\n"
        "1. Low-Res KMeans clusters the UNet's decoder features at 1/32 of the image side (16x16 at 512 px) into K segments (clusters; "
        "10-40 work about equally well). Coarse: one label per 32x32-pixel cell.\n"
        "2. Modulated Denoise Mapper nudges each coarse segment's cross-attention while "
        "denoising and gives every pixel to the segment whose nudge changed it most: "
        "pixel-sharp segments. quality = fast costs K+1 UNet evaluations and K+1 VAE decodes; "
        "faithful (the paper's 15 steps) about 30 times more.\n"
        f"3. {SELECTION_HELP}\n\n"
        "The info outputs say which UNet block was used and what it cost."))
    low = wf.node("EmergentSegLowResKMeans", (660, 0),
                  {"clusters": 20},
                  size=(400, 310))
    wf.link(ckpt, "MODEL", low, "model")
    wf.link(scale, "IMAGE", low, "image")
    wf.link(ckpt, "VAE", low, "vae")
    wf.link(ckpt, "CLIP", low, "clip")
    mapper = wf.node("EmergentSegModulatedDenoiseMapper", (660, 340),
                     {"quality": "fast"}, size=(400, 380))
    wf.link(ckpt, "MODEL", mapper, "model")
    wf.link(ckpt, "VAE", mapper, "vae")
    wf.link(scale, "IMAGE", mapper, "image")
    wf.link(low, "segmentation", mapper, "segmentation")
    wf.link(ckpt, "CLIP", mapper, "clip")
    coarse = _mask_output(wf, low, scale, (1100, 0), title="Mask Output (low-res)")
    sharp = _mask_output(wf, mapper, scale, (1520, 0), title="Mask Output (pixel-sharp)")
    mask = wf.node("MaskPreview", (1940, 0), size=(320, 360), title="Mask Preview (selection)")
    wf.link(sharp, "mask", mask, "mask")
    info_low = wf.node("PreviewAny", (1100, 640), size=(380, 160), title="Low-Res KMeans info")
    wf.link(low, "info", info_low, "source")
    info_map = wf.node("PreviewAny", (1520, 640), size=(380, 160), title="Mapper info")
    wf.link(mapper, "info", info_map, "source")
    assert coarse
    return wf


def inpaint_segment() -> Workflow:
    wf = Workflow("inpaint_segment")
    ckpt, _image, scale = _inputs(wf)
    _note(wf, (0, 520), (
        "Inpaint one segment: DiffSeg finds the segments, Mask Output picks the largest one "
        "(selection largest:1), grows it by 8 px and feathers its edge; the sampler repaints it "
        "from the prompt and the result is blended back with the feathered mask.\n\n"
        f"{SELECTION_HELP}\n\n"
        "VAE Encode (for Inpainting) fills the masked area with grey first, so keep denoise at "
        "1.0. Use an inpainting checkpoint for the best seams."))
    _capture, merge = _capture_merge(wf, ckpt, scale, 660, 0)
    out = _mask_output(wf, merge, scale, (1100, 0), selection="largest:1", grow=8, feather=8)
    mask = wf.node("MaskPreview", (1100, 640), size=(380, 360), title="Mask Preview (inpaint area)")
    wf.link(out, "mask", mask, "mask")
    pos = wf.node("CLIPTextEncode", (1520, 0), {"text": "a dramatic sunset sky with glowing orange "
                                                "clouds, highly detailed"}, size=(400, 160),
                  title="CLIP Text Encode (positive)", color="#232", bgcolor="#353")
    wf.link(ckpt, "CLIP", pos, "clip")
    neg = wf.node("CLIPTextEncode", (1520, 200), {"text": "blurry, low quality, watermark, text"},
                  size=(400, 160), title="CLIP Text Encode (negative)", color="#322", bgcolor="#533")
    wf.link(ckpt, "CLIP", neg, "clip")
    enc = wf.node("VAEEncodeForInpaint", (1520, 400), {"grow_mask_by": 6}, size=(400, 100))
    wf.link(scale, "IMAGE", enc, "pixels")
    wf.link(ckpt, "VAE", enc, "vae")
    wf.link(out, "mask", enc, "mask")
    sampler = wf.node("KSampler", (1960, 0),
                      {"seed": 42, "control_after_generate": "fixed", "steps": 20, "cfg": 7.0,
                       "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}, size=(315, 262))
    wf.link(ckpt, "MODEL", sampler, "model")
    wf.link(pos, "CONDITIONING", sampler, "positive")
    wf.link(neg, "CONDITIONING", sampler, "negative")
    wf.link(enc, "LATENT", sampler, "latent_image")
    dec = wf.node("VAEDecode", (1960, 300), size=(210, 46))
    wf.link(sampler, "LATENT", dec, "samples")
    wf.link(ckpt, "VAE", dec, "vae")
    blend = wf.node("ImageCompositeMasked", (1960, 390), {"x": 0, "y": 0, "resize_source": False},
                    size=(315, 146), title="Blend with the feathered mask")
    wf.link(scale, "IMAGE", blend, "destination")
    wf.link(dec, "IMAGE", blend, "source")
    wf.link(out, "mask", blend, "mask")
    save = wf.node("SaveImage", (2320, 0), {"filename_prefix": "emergent_seg/inpaint"}, size=(400, 460))
    wf.link(blend, "IMAGE", save, "images")
    return wf


def diffseg_refined_by_mapper() -> Workflow:
    wf = Workflow("diffseg_refined_by_mapper")
    ckpt, _image, scale = _inputs(wf)
    _note(wf, (0, 520), (
        "DiffSeg segments, sharpened by EmerDiff's Modulated Denoise Mapper.\n\n"
        "KL Merge's segments follow the 64x64 attention grid (8-pixel steps). The mapper pools "
        "them to the UNet's decoder grid (16x16 at 512 px), nudges each one while denoising and gives every "
        "pixel to the segment whose nudge changed it most, so edges follow the image. Words "
        "from a Capture Attention prompt carry over. Cost: one UNet evaluation and one VAE "
        "decode per segment, plus one (quality = fast).\n\n"
        "Compare the two Mask Output previews. " + SELECTION_HELP))
    _capture, merge = _capture_merge(wf, ckpt, scale, 660, 0)
    mapper = wf.node("EmergentSegModulatedDenoiseMapper", (660, 520),
                     {"quality": "fast"}, size=(400, 380))
    wf.link(ckpt, "MODEL", mapper, "model")
    wf.link(ckpt, "VAE", mapper, "vae")
    wf.link(scale, "IMAGE", mapper, "image")
    wf.link(merge, "segmentation", mapper, "segmentation")
    wf.link(ckpt, "CLIP", mapper, "clip")
    _mask_output(wf, merge, scale, (1100, 0), title="Mask Output (DiffSeg)")
    sharp = _mask_output(wf, mapper, scale, (1520, 0), title="Mask Output (refined)")
    mask = wf.node("MaskPreview", (1940, 0), size=(320, 360), title="Mask Preview (selection)")
    wf.link(sharp, "mask", mask, "mask")
    info = wf.node("PreviewAny", (1520, 640), size=(380, 160), title="Mapper info")
    wf.link(mapper, "info", info, "source")
    return wf


def segments_to_detailer() -> Workflow:
    wf = Workflow("segments_to_detailer", types={**NODE_TYPES, **IMPACT})
    ckpt, _image, scale = _inputs(wf)
    _note(wf, (0, 520), (
        "Needs ComfyUI Impact Pack (Detailer (SEGS), SEGSPreview, SEGS to MASK).\n\n"
        "Segments to SEGS turns DiffSeg's segments into Impact Pack SEGS: one item per selected "
        "segment with its box, a crop region crop_factor times larger, its mask inside that "
        "region and a label (a prompt word from Capture Attention, else 'segment N'). Here the "
        "three largest segments go to Detailer (SEGS), which redraws each one at guide_size "
        "from the prompt and pastes it back with a feathered mask.\n\n"
        "Selection: indices (0, 3, 5), ranges (2-4), all, largest:2, smallest:1, words, !2 to "
        "exclude. A Mask Output node on the same KL Merge shows the numbered overlay."),
        size=(615, 280))
    _capture, merge = _capture_merge(wf, ckpt, scale, 660, 0)
    to_segs = wf.node("EmergentSegToSEGS", (660, 520),
                      {"selection": "largest:3", "crop_factor": 3.0, "drop_size": 10, "image_index": 0},
                      size=(400, 180))
    wf.link(merge, "segmentation", to_segs, "segmentation")
    wf.link(scale, "IMAGE", to_segs, "image")
    pos = wf.node("CLIPTextEncode", (1100, 0), {"text": "highly detailed, sharp focus, intricate texture"},
                  size=(400, 160), title="CLIP Text Encode (positive)", color="#232", bgcolor="#353")
    wf.link(ckpt, "CLIP", pos, "clip")
    neg = wf.node("CLIPTextEncode", (1100, 200), {"text": "blurry, low quality, watermark, text"},
                  size=(400, 160), title="CLIP Text Encode (negative)", color="#322", bgcolor="#533")
    wf.link(ckpt, "CLIP", neg, "clip")
    detailer = wf.node("DetailerForEach", (1540, 0), {
        "guide_size": 512, "guide_size_for": True, "max_size": 1024, "seed": 42,
        "control_after_generate": "fixed", "steps": 20, "cfg": 7.0, "sampler_name": "euler",
        "scheduler": "normal", "denoise": 0.5, "feather": 5, "noise_mask": True, "force_inpaint": True,
        "wildcard": "", "cycle": 1, "inpaint_model": False, "noise_mask_feather": 20}, size=(400, 620))
    wf.link(scale, "IMAGE", detailer, "image")
    wf.link(to_segs, "segs", detailer, "segs")
    wf.link(ckpt, "MODEL", detailer, "model")
    wf.link(ckpt, "CLIP", detailer, "clip")
    wf.link(ckpt, "VAE", detailer, "vae")
    wf.link(pos, "CONDITIONING", detailer, "positive")
    wf.link(neg, "CONDITIONING", detailer, "negative")
    result = wf.node("PreviewImage", (1980, 0), size=(360, 400), title="Preview Image (detailed)")
    wf.link(detailer, "IMAGE", result, "images")
    crops = wf.node("SEGSPreview", (1100, 400), {"alpha_mode": True, "min_alpha": 0.2}, size=(400, 400))
    wf.link(to_segs, "segs", crops, "segs")
    combined = wf.node("SegsToCombinedMask", (1540, 680), size=(260, 30))
    wf.link(to_segs, "segs", combined, "segs")
    preview = wf.node("MaskPreview", (1980, 440), size=(360, 400), title="Mask Preview (detailed areas)")
    wf.link(combined, "MASK", preview, "mask")
    return wf


#: The SD3.5 checkpoint ComfyUI's own SD3.5 template loads (MMDiT + VAE + CLIP-L/G + T5-XXL fp8).
DIT_CHECKPOINT = "sd3.5_large_fp8_scaled.safetensors"
DIT_CHECKPOINT_MODELS = {"models": [{
    "name": DIT_CHECKPOINT,
    "url": "https://huggingface.co/Comfy-Org/stable-diffusion-3.5-fp8/resolve/main/"
           "sd3.5_large_fp8_scaled.safetensors?download=true",
    "directory": "checkpoints"}]}
DIT_SIZE = 1024              # SD3.5's and Flux's native size: 64x64 patches of 16 px


def dit_inpaint_segment() -> Workflow:
    """inpaint_segment on a DiT host (SD3.5 by default; the note says how to connect Flux)."""
    wf = Workflow("dit_inpaint_segment")
    ckpt = wf.node("CheckpointLoaderSimple", (0, 0), {"ckpt_name": DIT_CHECKPOINT}, size=(315, 98),
                   properties=DIT_CHECKPOINT_MODELS)
    image = wf.node("LoadImage", (0, 140), {"image": IMAGE}, size=(315, 330))
    scale = wf.node("ImageScale", (345, 140),
                    {"upscale_method": "area", "width": DIT_SIZE, "height": DIT_SIZE, "crop": "center"},
                    size=(270, 130))
    wf.link(image, "IMAGE", scale, "image")
    _note(wf, (0, 520), (
        "Segment and inpaint with a DiT (SD3/SD3.5 or Flux): no UNet, no extra model.\n\n"
        "Capture Attention reads the image->image part of the model's joint attention in one pass "
        "at noise level sigma (0 = the family's preset); levels 'all' = the family's default "
        "blocks. KL Merge groups it into segments, Mask Output picks the largest one (largest:1), "
        "grows it by 16 px and feathers it; the sampler repaints it from the prompt and the result "
        "is blended back. 1024 px is the native size of SD3.5 and Flux (a 64x64 attention grid).\n\n"
        "SD3.5: this is the checkpoint of ComfyUI's SD3.5 template (text encoders inside); "
        "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors works the same. A checkpoint without "
        "text encoders (sd3.5_large.safetensors) needs a TripleCLIPLoader (clip_g, clip_l, t5xxl) "
        "on the CLIP inputs.\n\n"
        "Flux dev: load flux1-dev-fp8.safetensors here, or replace Load Checkpoint with Load "
        "Diffusion Model (flux1-dev.safetensors) -> MODEL, DualCLIPLoader (clip_l, t5xxl_fp16, "
        "type flux) -> CLIP and Load VAE (ae.safetensors) -> VAE, wired to the same inputs. Set "
        "the KSampler's cfg to 1.0 and its scheduler to simple (Flux dev has no negative prompt; its "
        "guidance, 3.5, is built in: add FluxGuidance to change it). With Flux Fill, use "
        "InpaintModelConditioning instead of VAE Encode (for Inpainting).\n\n"
        f"{SELECTION_HELP}"), size=(615, 420))
    _capture, merge = _capture_merge(wf, ckpt, scale, 660, 0)
    out = _mask_output(wf, merge, scale, (1100, 0), selection="largest:1", grow=16, feather=16)
    mask = wf.node("MaskPreview", (1100, 640), size=(380, 360), title="Mask Preview (inpaint area)")
    wf.link(out, "mask", mask, "mask")
    pos = wf.node("CLIPTextEncode", (1520, 0), {"text": "a dramatic sunset sky with glowing orange "
                                                "clouds, highly detailed"}, size=(400, 160),
                  title="CLIP Text Encode (positive)", color="#232", bgcolor="#353")
    wf.link(ckpt, "CLIP", pos, "clip")
    neg = wf.node("CLIPTextEncode", (1520, 200), {"text": "blurry, low quality, watermark, text"},
                  size=(400, 160), title="CLIP Text Encode (negative)", color="#322", bgcolor="#533")
    wf.link(ckpt, "CLIP", neg, "clip")
    enc = wf.node("VAEEncodeForInpaint", (1520, 400), {"grow_mask_by": 6}, size=(400, 100))
    wf.link(scale, "IMAGE", enc, "pixels")
    wf.link(ckpt, "VAE", enc, "vae")
    wf.link(out, "mask", enc, "mask")
    sampler = wf.node("KSampler", (1960, 0),
                      {"seed": 42, "control_after_generate": "fixed", "steps": 20, "cfg": 4.0,
                       "sampler_name": "euler", "scheduler": "sgm_uniform", "denoise": 1.0}, size=(315, 262))
    wf.link(ckpt, "MODEL", sampler, "model")
    wf.link(pos, "CONDITIONING", sampler, "positive")
    wf.link(neg, "CONDITIONING", sampler, "negative")
    wf.link(enc, "LATENT", sampler, "latent_image")
    dec = wf.node("VAEDecode", (1960, 300), size=(210, 46))
    wf.link(sampler, "LATENT", dec, "samples")
    wf.link(ckpt, "VAE", dec, "vae")
    blend = wf.node("ImageCompositeMasked", (1960, 390), {"x": 0, "y": 0, "resize_source": False},
                    size=(315, 146), title="Blend with the feathered mask")
    wf.link(scale, "IMAGE", blend, "destination")
    wf.link(dec, "IMAGE", blend, "source")
    wf.link(out, "mask", blend, "mask")
    save = wf.node("SaveImage", (2320, 0), {"filename_prefix": "emergent_seg/dit_inpaint"}, size=(400, 460))
    wf.link(blend, "IMAGE", save, "images")
    return wf


WORKFLOWS = (diffseg_segment, emerdiff_segment, inpaint_segment, diffseg_refined_by_mapper,
             dit_inpaint_segment)
#: The ones for DiT hosts (SD3.5 checkpoint at 1024 px); the others load SD1.5 at 512 px.
DIT_WORKFLOWS = (dit_inpaint_segment,)
#: Workflows that need another node pack (Impact Pack) live in docs/workflows/, outside
#: example_workflows/: ComfyUI's template menu and every tool that runs the example workflows on a
#: bare host only ever see workflows whose nodes are all core or ours.
PACK_WORKFLOW_DIR = os.path.join(ROOT, "docs", "workflows")
PACK_WORKFLOWS = (segments_to_detailer,)


def targets() -> list[tuple[str, object]]:
    """``(path, builder)`` of every generated workflow."""
    return [(os.path.join(OUT_DIR, b.__name__ + ".json"), b) for b in WORKFLOWS] + \
        [(os.path.join(PACK_WORKFLOW_DIR, b.__name__ + ".json"), b) for b in PACK_WORKFLOWS]


def render(build) -> str:
    return json.dumps(build().to_json(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for path, build in targets():
        text = render(build)
        old = None
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                old = f.read()
        if old == text:
            continue
        if check:
            stale.append(path)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            print("wrote", os.path.relpath(path, ROOT))
    if stale:
        print("out of date (run python tests/make_workflows.py):", *stale, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
