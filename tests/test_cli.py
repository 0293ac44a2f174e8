"""``python -m emergent_seg segment`` (through ``cli.main``) on a tiny random diffusers UNet saved as a
model folder with only ``unet/`` (pixel space: no VAE, no text encoder -> zero conditioning):
DiffSeg, EmerDiff (K = 2, fast) and DiffSeg refined by the EmerDiff mapper, the files they write,
and the one-line errors for bad input."""
import re

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from emergent_seg import cli, engines

SIZE = 32


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """SD1.x block layout at toy width, 3 channels in and out (pixel space), 3 downsamplings."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=SIZE, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(16, 16, 32, 32), norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=16, attention_head_dim=4).eval()
    folder = tmp_path_factory.mktemp("tiny_model")
    unet.save_pretrained(folder / "unet")
    return folder


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    rgb = np.zeros((48, 40, 3), dtype=np.uint8)       # not square: fitted to --size
    rgb[:, :20] = (200, 40, 30)
    rgb[:, 20:] = (30, 180, 60)
    rgb[30:, 10:30] = (20, 30, 200)
    path = tmp_path_factory.mktemp("images") / "scene.png"
    Image.fromarray(rgb).save(path)
    return path


def segment(model_dir, image_path, out, *extra):
    return cli.main(["segment", str(image_path), "--model", str(model_dir), "--out", str(out),
                     "--size", str(SIZE), "--device", "cpu", "--quiet", *extra])


def check_outputs(out, capsys):
    printed = capsys.readouterr().out
    match = re.search(r"scene: (\d+) (segment|segments) ->", printed)
    assert match, printed
    count = int(match.group(1))
    assert (match.group(2) == "segment") == (count == 1)
    labels = np.asarray(Image.open(out / "scene_labels.png"))
    overlay = np.asarray(Image.open(out / "scene_overlay.png"))
    assert labels.shape == (SIZE, SIZE) and overlay.shape == (SIZE, SIZE, 3)
    assert sorted(np.unique(labels).tolist()) == list(range(count))
    segs = sorted(p.name for p in out.glob("scene_seg*.png"))
    assert segs == [f"scene_seg{i:02d}.png" for i in range(count)]
    masks = np.stack([np.asarray(Image.open(out / name)) for name in segs])
    assert masks.shape == (count, SIZE, SIZE)
    assert (masks > 127).sum(0).tolist() == np.ones((SIZE, SIZE), dtype=int).tolist()  # a partition
    for i in range(count):
        assert np.array_equal(masks[i] > 127, labels == i)
    return count, labels


def test_diffseg(model_dir, image_path, tmp_path, capsys):
    assert segment(model_dir, image_path, tmp_path / "diffseg") == 0
    count, _ = check_outputs(tmp_path / "diffseg", capsys)
    assert count >= 1


def test_emerdiff_fast(model_dir, image_path, tmp_path, capsys):
    out = tmp_path / "emerdiff"
    assert segment(model_dir, image_path, out, "--method", "emerdiff", "--clusters", "2",
                   "--steps", "fast", "--seed", "3") == 0
    count, labels = check_outputs(out, capsys)
    assert 1 <= count <= 2
    # deterministic for a fixed seed
    assert segment(model_dir, image_path, tmp_path / "again", "--method", "emerdiff", "--clusters", "2",
                   "--seed", "3") == 0
    _, again = check_outputs(tmp_path / "again", capsys)
    assert np.array_equal(labels, again)


def test_diffseg_refined_by_the_mapper(model_dir, image_path, tmp_path, capsys):
    out = tmp_path / "refined"
    assert segment(model_dir, image_path, out, "--refine", "emerdiff", "--tau", "0.5") == 0
    count, _ = check_outputs(out, capsys)
    assert count >= 1


def test_segment_one_uses_the_core_api(model_dir, image_path):
    """The Segmentation behind the files: method, presets and cost bookkeeping."""
    from emergent_seg.core.backends.loading import load_backend
    from emergent_seg.core.images import fit_image, read_image

    backend = load_backend(str(model_dir), "cpu")
    image = fit_image(read_image(image_path), str(SIZE), backend.size_multiple()).unsqueeze(0)
    parser_args = ["segment", "x", "--method", "emerdiff", "--clusters", "2"]
    args = _parse(parser_args)
    seg = engines._segment_images(backend, image, None, args, engines.Progress())
    assert seg.method == "emerdiff" and seg.labels.shape == (1, SIZE, SIZE)
    assert seg.info["steps"] == 1 and seg.info["difference"] == "one_sided" and seg.info["k"] == 2
    # auto grid = 1/32 of the image side; a 32 px pixel-space image gets the coarsest decoder grid
    assert seg.info["grid"] == [8, 8] and seg.info["evaluations"] == 1 + 3
    args = _parse(["segment", "x", "--refine", "emerdiff", "--steps", "faithful", "--tau", "0.5"])
    ref = engines._segment_images(backend, image, None, args, engines.Progress())
    assert ref.method == "diffseg+mapper" and ref.info["steps"] == 15 and ref.info["difference"] == "symmetric"
    with pytest.raises(cli.EmergentSegError, match="--refine kmeans"):
        engines._segment_images(backend, image, None, _parse(["segment", "x", "--method", "emerdiff",
                                                              "--refine", "kmeans"]), engines.Progress())


def _parse(argv):
    import argparse
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    cli.add_segment_args(sub.add_parser("segment"))
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------ errors


def _error(capsys):
    """The one ``error: ...`` line (library warnings may share stderr), with no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_unreadable_image(model_dir, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    assert segment(model_dir, bad, tmp_path / "o") == 2
    assert "cannot read image" in _error(capsys)
    assert segment(model_dir, tmp_path / "missing.png", tmp_path / "o") == 2
    assert "does not exist" in _error(capsys)


def test_size_not_a_multiple(model_dir, image_path, tmp_path, capsys):
    code = cli.main(["segment", str(image_path), "--model", str(model_dir), "--out", str(tmp_path / "o"),
                     "--size", "100", "--quiet", "--device", "cpu"])
    assert code == 2
    err = _error(capsys)
    assert "100x100 is not a multiple of 8" in err and "use 96x96" in err


def test_pickle_checkpoint_is_refused(image_path, tmp_path, capsys):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04pickle")
    assert cli.main(["segment", str(image_path), "--model", str(ckpt), "--out", str(tmp_path / "o"),
                     "--quiet"]) == 2
    err = _error(capsys)
    assert "pickle checkpoint" in err and ".safetensors" in err


def test_too_many_clusters(model_dir, image_path, tmp_path, capsys):
    assert segment(model_dir, image_path, tmp_path / "o", "--method", "emerdiff", "--clusters", "300") == 2
    assert "K = 300" in _error(capsys)


def _huge_png_header(path, width, height):
    """A PNG whose header claims ``width x height`` (only the header is ever read)."""
    import io
    import struct
    import zlib
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("extra, needle", [
    (["--tau", "-1"], "tau must be > 0"),
    (["--iterations", "0"], "iterations must be"),
    (["--tau-quantile", "1.5"], "tau_quantile must be in (0, 1]"),
    (["--tau", "1", "--tau-quantile", "0.2"], "not both"),
    (["--clusters", "1"], "--clusters must be at least 2"),
    (["--sigma", "-2"], "--sigma must be >= 0"),
    (["--size", "12xq"], "not understood"),
])
def test_bad_options_fail_before_the_model_loads(image_path, tmp_path, capsys, monkeypatch, extra, needle):
    import emergent_seg.core.backends.loading as loading

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")
    monkeypatch.setattr(loading, "load_backend", no_model)
    assert cli.main(["segment", str(image_path), "--out", str(tmp_path / "o"), "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_output_problems_are_one_line_and_early(image_path, tmp_path, capsys, monkeypatch):
    import emergent_seg.core.backends.loading as loading
    monkeypatch.setattr(loading, "load_backend", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    assert cli.main(["segment", str(image_path), "--out", str(a_file), "--quiet"]) == 2
    assert "is an existing file" in capsys.readouterr().err
    assert cli.main(["segment", str(image_path), "--out", str(a_file / "below"), "--quiet"]) == 2
    assert "cannot write to --out" in capsys.readouterr().err
    huge = tmp_path / "huge.png"
    _huge_png_header(huge, 10000, 10000)
    assert cli.main(["segment", str(huge), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "10000x10000" in err and "megapixels" in err and err.count("\n") == 1


def test_a_rerun_with_fewer_segments_removes_the_stale_masks(model_dir, image_path, tmp_path, capsys):
    out = tmp_path / "rerun"
    out.mkdir()
    for i in range(12):  # an earlier run's masks, more than any run here makes
        (out / f"scene_seg{i:02d}.png").write_bytes(b"old")
    (out / "other_seg05.png").write_bytes(b"keep")  # another image's outputs are left alone
    assert segment(model_dir, image_path, out, "--tau", "0.5") == 0
    count, _ = check_outputs(out, capsys)
    assert not any(p.read_bytes() == b"old" for p in out.glob("scene_seg*.png"))
    assert (out / "other_seg05.png").read_bytes() == b"keep"


def test_png_writes_are_atomic(tmp_path, monkeypatch):
    from emergent_seg.core.images import save_png

    target = tmp_path / "mask.png"
    save_png(torch.ones(4, 4), target)
    before = target.read_bytes()

    def crash(self, fp, *a, **k):          # dies half-way through writing the new file
        open(fp, "wb").write(b"\x89PNG half")
        raise KeyboardInterrupt
    monkeypatch.setattr(Image.Image, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_png(torch.zeros(4, 4), target)
    assert target.read_bytes() == before                 # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.png"]   # no partial file left


def test_ctrl_c_is_one_line_and_exit_code_130(model_dir, image_path, tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(engines, "_segment_images", interrupted)
    out = tmp_path / "out"
    assert cli.main(["segment", str(image_path), "--model", str(model_dir), "--out", str(out), "--quiet"]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: interrupted") and "\n" not in err and "Traceback" not in err
    assert not list(out.glob("*.png"))


def test_cancel_through_progress_is_one_line(model_dir, image_path, tmp_path, capsys, monkeypatch):
    from emergent_seg.core.backend import Progress
    from emergent_seg.progress import TerminalProgress

    monkeypatch.setattr(TerminalProgress, "__call__",
                        lambda self: Progress(is_cancelled=lambda: True))
    out = tmp_path / "out"
    assert cli.main(["segment", str(image_path), "--model", str(model_dir), "--out", str(out), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == "error: cancelled by the user"
    assert not list(out.glob("*.png"))
