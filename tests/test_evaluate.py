"""Evaluation harness (evaluation/), calibration, and the ``demo``/``eval`` commands.

Everything here runs on a freshly initialised miniature SD (the embedded model's architecture)
saved to a temp dir, so it never depends on the trained weights or on their quality.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from emergent_seg import cli
from emergent_seg import evaluation as V
from emergent_seg.evaluation import scoring
from emergent_seg.core.errors import EmergentSegError
from emergent_seg.core.metrics import SegmentationScorer, instance_scores
from emergent_seg.core.settings import DiffSegSettings
from emergent_seg.fixture.scenes import EVAL_SEED, TEXTURE_NAMES, make_scenes


SIZE = 64  # scenes small enough for a fast suite; the model takes any multiple of 64


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory) -> Path:
    from mini_sd import save_random_mini_sd

    # seed 123, not 0: the random-weights baseline uses seed 0
    return save_random_mini_sd(tmp_path_factory.mktemp("mini_sd"), seed=123,
                               calibration={"native_size": SIZE})


@pytest.fixture(scope="module")
def backend(fixture_dir):
    from emergent_seg.core.backends.loading import load_backend
    return load_backend(fixture_dir)


@pytest.fixture
def default_model(fixture_dir, monkeypatch):
    """``load_backend(None)`` -> the temp model (the CLI's embedded default)."""
    import emergent_seg.core.backends.loading as loading
    monkeypatch.setattr(loading, "EMBEDDED_MODEL", fixture_dir)
    return fixture_dir


# ---------------------------------------------------------------------------------------------
# label tables and preprocessing
# ---------------------------------------------------------------------------------------------

def test_coco_fine_to_coarse_table():
    t = V.COCO_FINE_TO_COARSE
    assert len(t) == 182 and set(t) == set(range(27)) and len(V.COCO_COARSE_NAMES) == 27
    fine = torch.tensor([0, 2, 15, 71, 91, 105, 156, 168, 181, 255, 200])
    # person->person, car->vehicle, bird->animal, tv->electronic, banner->textile, clouds->sky,
    # sky-other->sky, tree->plant, wood->solid, unlabelled->ignore, out of range->ignore
    assert V.coco_fine_to_coarse(fine).tolist() == [9, 11, 7, 0, 17, 23, 23, 22, 24, -1, -1]
    assert V.COCO_COARSE_NAMES[9] == "person" and V.COCO_COARSE_NAMES[23] == "sky"
    # things (0..11) come from fine ids 0..90, stuff (12..26) from 91..181
    assert max(t[:91]) <= 11 and min(t[91:]) >= 12


def test_cityscapes_mapping():
    ids = torch.tensor([0, 1, 6, 7, 8, 20, 33, 34, 255])
    assert V.cityscapes_to_27(ids).tolist() == [-1, -1, -1, 0, 1, 13, 26, -1, -1]
    assert len(V.CITYSCAPES_NAMES) == 27 and V.CITYSCAPES_NAMES[0] == "road" and V.CITYSCAPES_NAMES[-1] == "bicycle"


def test_centre_crop_resize_matches_diffseg_preprocessing():
    img = torch.rand(3, 40, 60)
    lab = torch.arange(60).repeat(40, 1)  # label = column index
    out, lab_out = V.centre_crop_resize(img, lab, 20)
    assert out.shape == (3, 20, 20) and lab_out.shape == (20, 20) and lab_out.dtype == torch.int64
    # crop starts at column (60-40)//2 = 10; nearest with half-pixel centres picks column 10+2j+1
    assert lab_out[0].tolist() == [10 + 2 * j + 1 for j in range(20)]
    same, lab_same = V.centre_crop_resize(img, lab, 40)
    assert torch.equal(same, img[:, :, 10:50]) and torch.equal(lab_same, lab[:, 10:50])
    with pytest.raises(EmergentSegError, match="does not match"):
        V.centre_crop_resize(img, lab[:10], 20)


# ---------------------------------------------------------------------------------------------
# dataset loaders (fake folders)
# ---------------------------------------------------------------------------------------------

def _save(path: Path, arr: np.ndarray) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_coco_loader_layouts_and_mapping(tmp_path):
    root = tmp_path / "coco"
    ids = ["000000000139", "000000000285"]
    (root / "curated" / "val2017").mkdir(parents=True)
    (root / "curated" / "val2017" / V.COCO_LIST).write_text("\n".join(ids) + "\n")
    for i, name in enumerate(ids):
        _save(root / "images" / "val2017" / f"{name}.jpg", np.full((30, 50, 3), 100 + i, np.uint8))
        fine = np.full((30, 50), 255, np.uint8)
        fine[:, 25:] = 156  # sky-other -> sky (23)
        fine[:10, :] = 0    # person -> 9
        _save(root / "annotations" / "val2017" / f"{name}.png", fine)
    ds = V.open_dataset("coco-stuff-27", str(root), size=16)
    assert len(ds) == 2 and ds.num_classes == 27
    samples = list(ds)
    assert samples[0].name == ids[0] and samples[0].image.shape == (3, 16, 16)
    assert set(torch.unique(samples[0].labels).tolist()) == {-1, 9, 23}
    assert len(V.open_dataset("coco", str(root), size=16, limit=1)) == 1


def test_coco_loader_names_the_layout_when_files_are_missing(tmp_path):
    with pytest.raises(EmergentSegError, match="Coco164kFull_Stuff_Coarse_7.txt"):
        V.open_dataset("coco-stuff-27", str(tmp_path))
    with pytest.raises(EmergentSegError, match="is not a folder"):
        V.open_dataset("coco-stuff-27", str(tmp_path / "nope"))
    (tmp_path / V.COCO_LIST).write_text("000000000139\n")
    (tmp_path / "val2017").mkdir()
    (tmp_path / "annotation_val2017").mkdir()
    with pytest.raises(EmergentSegError, match=r"1 listed files are missing|2 listed files are missing") as err:
        V.open_dataset("coco-stuff-27", str(tmp_path))
    assert "val2017" in str(err.value) and "expected under" in str(err.value)
    with pytest.raises(EmergentSegError, match="needs --data"):
        V.open_dataset("coco-stuff-27", None)
    with pytest.raises(EmergentSegError, match="unknown dataset"):
        V.open_dataset("ade20k", str(tmp_path))


def test_cityscapes_loader(tmp_path):
    root = tmp_path / "cs"
    with pytest.raises(EmergentSegError, match="leftImg8bit/val/<city>"):
        V.open_dataset("cityscapes", str(root))
    _save(root / "leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png", np.zeros((20, 40, 3), np.uint8))
    (root / "gtFine/val/lindau").mkdir(parents=True)
    with pytest.raises(EmergentSegError, match="_gtFine_labelIds.png is missing"):
        V.open_dataset("cityscapes", str(root))
    ids = np.zeros((20, 40), np.uint8)
    ids[:, 20:] = 7   # road -> 0
    ids[:5, :] = 26   # car -> 19
    _save(root / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png", ids)
    (sample,) = list(V.open_dataset("cityscapes", str(root), size=10))
    assert sample.image.shape == (3, 10, 10)
    assert set(torch.unique(sample.labels).tolist()) == {-1, 0, 19}


def test_synthetic_dataset_classes_are_textures():
    ds = V.SyntheticDataset(3, size=SIZE)
    assert ds.seed == EVAL_SEED and ds.num_classes == len(TEXTURE_NAMES)
    for sample, scene in zip(ds, make_scenes(3, EVAL_SEED, SIZE)):
        assert torch.equal(sample.instances, scene.labels)
        for region, texture in enumerate(scene.textures):
            assert (sample.labels[scene.labels == region] == TEXTURE_NAMES.index(texture)).all()
        assert sample.true_k == scene.num_instances + 1


# ---------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------

def _colour_samples(n: int = 4, size: int = 12) -> list[V.Sample]:
    """Images whose classes have unique colours: colour k-means is perfect under both protocols."""
    colours = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    out = []
    for i in range(n):
        lab = torch.zeros(size, size, dtype=torch.int64)
        lab[:, size // 2:] = 1 + (i % 2)       # class 1 or 2 on the right
        lab[: size // 3, : size // 3] = -1     # ignored corner
        img = colours[lab.clamp(min=0)].permute(2, 0, 1).contiguous()
        out.append(V.Sample(f"s{i}", img, lab))
    return out


def test_perfect_colour_segmentation_scores_one_under_both_protocols():
    ev = V.evaluate(_colour_samples(), ["color-kmeans", "one-segment"], None, num_classes=3)
    km, one = ev.rows
    assert km["per_image_miou"] == pytest.approx(1.0) and km["dataset_miou"] == pytest.approx(1.0)
    assert km["per_image_acc"] == pytest.approx(1.0) and km["dataset_acc"] == pytest.approx(1.0)
    assert km["instance_miou"] is None and km["segments"] == pytest.approx(2.0)
    assert one["segments"] == 1.0 and one["per_image_miou"] < 0.6


def test_dataset_protocol_needs_consistent_ids_per_image_does_not():
    """Per-image matching forgives a per-image permutation of ids; the dataset protocol (one
    matching after clustering embeddings) only scores what the embeddings make consistent."""
    samples = _colour_samples(6)
    acc = scoring._Acc(SegmentationScorer(3, "per_image"))
    for i, s in enumerate(samples):
        pred = torch.where(s.labels < 0, torch.zeros_like(s.labels), s.labels)
        pred = (pred + i) % 3  # a different id permutation per image
        acc.per_image.update(pred, s.labels)
        from emergent_seg.core.metrics import confusion
        acc.hists.append(confusion(s.labels, pred, 3, 3))
        # embeddings that identify the true class -> dataset protocol recovers it exactly
        emb = torch.zeros(3, 3)
        for p in range(3):
            emb[p, (p - i) % 3] = 1.0
        acc.embeds.append(emb)
    assert acc.per_image.compute()["miou"] == pytest.approx(1.0)
    assert scoring._dataset_scores(acc, 3, seed=0)["miou"] == pytest.approx(1.0)
    # uninformative (identical) embeddings put every segment in one cluster: far from perfect
    acc.embeds = [torch.zeros(3, 3) for _ in samples]
    assert scoring._dataset_scores(acc, 3, seed=0)["miou"] < 0.7


def test_segment_features_are_area_weighted_cell_means():
    labels = torch.zeros(4, 4, dtype=torch.int64)
    labels[:, 3] = 1  # segment 1 = last column: half of cells (0,1),(1,1)
    feats = torch.arange(4, dtype=torch.float32).view(4, 1)  # 2x2 grid, cell value = index
    emb = V.segment_features(labels, feats, (2, 2))
    # segment 1 lies in cells 1 and 3 equally -> 2.0; segment 0: cells 0,2 (4 px each) and 1,3 (2 px each)
    assert emb[1, 0] == pytest.approx(2.0)
    assert emb[0, 0] == pytest.approx((4 * 0 + 2 * 1 + 4 * 2 + 2 * 3) / 12)
    img = torch.zeros(3, 4, 4)
    img[0, :, 3] = 1
    assert V.segment_colours(labels, img).tolist() == [[0, 0, 0], [1, 0, 0]]


def test_parse_methods():
    assert V.parse_methods("diffseg, colour-kmeans,diffseg-fast") == ["diffseg-fast", "color-kmeans"]
    with pytest.raises(EmergentSegError, match="unknown method"):
        V.parse_methods("diffseg,sam")
    assert set(V.DEFAULT_METHODS) <= set(V.METHODS)
    # the default list of `python -m emergent_seg eval --methods` parses
    V.parse_methods("diffseg-fast,diffseg-parity,emerdiff,diffseg+mapper,random,color-kmeans,one-segment")


def test_settings_come_from_calibration(backend):
    s = V.diffseg_settings(backend)
    assert s.tau == 1.1 and s.tau_quantile is None and s.timestep == 300
    assert V.diffseg_settings(backend, dataset="cityscapes").tau == 0.9
    fake = type("B", (), {"calibration": {"tau_quantile": 0.2, "timestep": 250}})()
    s = V.diffseg_settings(fake)
    assert s.tau is None and s.tau_quantile == 0.2 and s.timestep == 250
    assert V.model_size(backend) == SIZE and V.model_size(object()) == 512


def test_random_backend_same_architecture_new_weights(backend):
    rnd = V.random_backend(backend, seed=0)
    a, b = dict(backend.unet.named_parameters()), dict(rnd.unet.named_parameters())
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith("weight"))
    assert [s.key for s in rnd.sites()] == [s.key for s in backend.sites()]
    again = V.random_backend(backend, seed=0)
    assert all(torch.equal(p, q) for p, q in zip(rnd.unet.parameters(), again.unet.parameters()))


def test_evaluate_all_methods_smoke(backend):
    ds = V.SyntheticDataset(2, size=SIZE)
    updates = []
    from emergent_seg.core.backend import Progress
    progress = Progress(on_update=lambda d, t: updates.append((d, t)))
    seen = []
    ev = V.evaluate(ds, list(V.METHODS), backend, num_classes=ds.num_classes,
                    emerdiff=V.emerdiff_settings(backend, SIZE, clusters=3), progress=progress,
                    on_image=lambda s, labels: seen.append(sorted(labels)))
    assert [r["method"] for r in ev.rows] == list(V.METHODS)
    assert updates[-1] == (2 * len(V.METHODS), 2 * len(V.METHODS))
    assert len(seen) == 2 and seen[0] == sorted(V.METHODS)
    for r in ev.rows:
        for key in ("instance_miou", "per_image_miou", "per_image_acc", "dataset_miou", "dataset_acc"):
            assert 0.0 <= r[key] <= 1.0, (r["method"], key, r[key])
        assert r["seconds"] >= 0 and r["segments"] >= 1
    rows = {r["method"]: r for r in ev.rows}
    assert rows["emerdiff-lowres"]["segments"] <= 3 and ev.meta["emerdiff"]["k"] == 3
    # mapper methods include the time of what they build on
    assert rows["diffseg+mapper"]["seconds"] >= rows["diffseg-fast"]["seconds"]
    assert rows["emerdiff"]["seconds"] >= rows["emerdiff-lowres"]["seconds"]
    table = V.format_table(ev, "smoke")
    assert table.count("\n| ") == len(V.METHODS) + 1 and "instance mIoU" in table and "K=3" in table
    json.loads(ev.to_json())


def test_instance_miou_matches_metrics(backend):
    ds = V.SyntheticDataset(3, size=SIZE)
    ev = V.evaluate(ds, ["one-segment"], None, num_classes=ds.num_classes)
    want = np.mean([instance_scores(torch.zeros_like(s.labels), s.labels)["miou"] for s in make_scenes(3, EVAL_SEED, SIZE)])
    assert ev.rows[0]["instance_miou"] == pytest.approx(want)


# ---------------------------------------------------------------------------------------------
# CLI: eval and demo
# ---------------------------------------------------------------------------------------------

def test_cli_eval_writes_markdown_and_json(default_model, tmp_path, capsys):
    out = tmp_path / "table.md"
    rc = cli.main(["eval", "--scenes", "2", "--methods", "diffseg-fast,random,color-kmeans,one-segment",
                   "--out", str(out), "--quiet"])
    assert rc == 0
    text = out.read_text()
    assert "| diffseg-fast |" in text and "| one-segment |" in text and "per-image mIoU" in text
    assert text in capsys.readouterr().out
    data = json.loads(out.with_suffix(".json").read_text())
    assert [r["method"] for r in data["rows"]] == ["diffseg-fast", "random", "color-kmeans", "one-segment"]


def test_cli_eval_reports_dataset_errors(default_model, tmp_path, capsys):
    assert cli.main(["eval", "--dataset", "cityscapes", "--data", str(tmp_path), "--quiet"]) == 2
    assert "leftImg8bit/val" in capsys.readouterr().err


def test_module_eval_exposes_emerdiff_options(default_model, tmp_path):
    out = tmp_path / "t.md"
    assert V.main(["eval", "--scenes", "1", "--methods", "emerdiff,emerdiff-lowres", "--clusters", "2",
                   "--steps", "1", "--out", str(out), "--quiet"]) == 0
    assert "K=2" in out.read_text()


def test_demo_writes_report(default_model, tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--scenes", "2", "--out", str(out), "--quiet"]) == 0
    html_text = (out / "index.html").read_text()
    assert "<script" not in html_text.lower()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scenes"] == 2 and 0 <= summary["mean_miou"] <= 1
    for row in summary["rows"]:
        for key in ("image", "overlay", "gt"):
            assert (out / row[key]).exists() and f'src="{row[key]}"' in html_text
        assert row["caption"] in html_text
    from emergent_seg.core.images import read_image
    assert read_image(out / summary["rows"][0]["overlay"]).shape[-1] >= 128  # enlarged for viewing
    assert "mean mIoU" in capsys.readouterr().out


def test_demo_html_escapes_text():
    row = {"name": "<b>x</b>", "caption": "a <script>alert(1)</script> & b", "image": 'a".png',
           "overlay": "o.png", "gt": "g.png", "segments": 2, "true_segments": 3, "miou": 0.5}
    summary = {"first_seed": 1, "last_seed": 1, "size": 32, "mean_miou": 0.5, "model": "<m>",
               "settings": {"tau": 1.1, "note": "<i>"}, "seconds": 1.0}
    page = cli._demo_html([row], summary)
    assert "<script" not in page and "&lt;script&gt;" in page and "&lt;b&gt;x&lt;/b&gt;" in page
    assert 'src="a&quot;.png"' in page and "&lt;m&gt;" in page and "&lt;i&gt;" in page


def test_demo_without_model_names_the_fix(monkeypatch, tmp_path, capsys):
    import emergent_seg.core.backends.loading as loading
    monkeypatch.setattr(loading, "EMBEDDED_MODEL", tmp_path / "none")
    assert cli.main(["demo", "--out", str(tmp_path / "d"), "--quiet"]) == 2
    assert "--model" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# calibration
# ---------------------------------------------------------------------------------------------

def test_calibrate_picks_one_threshold_and_refuses_eval_seeds(backend):
    scenes = make_scenes(2, V.CALIBRATION_SEED, SIZE)
    cal = V.calibrate(backend, scenes, taus=(0.01, 1.1), quantiles=(0.2,), emerdiff_ks=(2, 3), refine=False)
    assert ("tau" in cal) != ("tau_quantile" in cal)
    assert cal["timestep"] == 300 and cal["emerdiff_k"] in (2, 3)
    names = set(cal["candidates"])
    assert {"t300:tau=0.01", "t300:tau=1.1", "t300:tau_quantile=0.2"} <= names
    assert len(names) <= 4  # + the median over scenes of the q=0.2 threshold, as a fixed tau
    best = max(v["miou"] for v in cal["candidates"].values())
    assert cal["diffseg_score"] == pytest.approx(best, abs=1e-4)
    assert cal["scenes"]["first_seed"] == V.CALIBRATION_SEED < EVAL_SEED
    json.dumps(cal)
    refined = V.calibrate(backend, scenes[:1], taus=(0.01,), quantiles=(0.2,), emerdiff_ks=())
    names = set(refined["candidates"])
    assert {f"t300:tau_quantile={q:g}" for q in (0.15, 0.175, 0.2, 0.225, 0.25)} <= names
    assert sum(n.startswith("t300:tau=") for n in names) >= 2 + 4 - 1  # given + median + 4 steps (may coincide)
    assert "emerdiff_k" not in refined
    with pytest.raises(EmergentSegError, match="held out"):
        V.calibrate(backend, make_scenes(1, EVAL_SEED, SIZE), taus=(1.1,), quantiles=(), emerdiff_ks=())


def test_write_calibration_round_trip(fixture_dir, tmp_path):
    import shutil
    from emergent_seg.core.backends.loading import load_backend

    directory = tmp_path / "w"
    shutil.copytree(fixture_dir, directory)
    V.write_calibration(directory, {"tau": 0.5, "timestep": 300, "emerdiff_k": 4, "prompt": ""})
    V.write_calibration(directory, {"tau_quantile": 0.25, "timestep": 300, "emerdiff_k": 4})
    config = json.loads((directory / "emergent_seg.json").read_text())
    cal = config["calibration"]
    assert cal["tau_quantile"] == 0.25 and "tau" not in cal and cal["prompt"] == "" and cal["emerdiff_k"] == 4
    assert cal["native_size"] == SIZE  # earlier entries are kept
    b = load_backend(directory)
    import argparse
    args = argparse.Namespace(tau=None, tau_quantile=None, timestep=300, iterations=3,
                              anchors=16, mode="fast", refine="none")
    s = DiffSegSettings.for_model(b, **cli.diffseg_overrides(args))
    assert s.tau is None and s.tau_quantile == 0.25
    assert V.diffseg_settings(b).tau_quantile == 0.25
    with pytest.raises(EmergentSegError, match="not a model folder"):
        V.write_calibration(tmp_path / "missing", {"tau": 1.0})


def test_calibrate_command(fixture_dir, tmp_path, capsys):
    import shutil
    directory = tmp_path / "w"
    shutil.copytree(fixture_dir, directory)
    assert V.main(["calibrate", "--weights", str(directory), "--scenes", "1", "--write", "--quiet"]) == 0
    cal = json.loads((directory / "emergent_seg.json").read_text())["calibration"]
    assert ("tau" in cal) != ("tau_quantile" in cal) and "candidates" in cal
    assert V.main(["calibrate", "--weights", str(directory), "--scenes", "1", "--seed", str(EVAL_SEED),
                   "--quiet"]) == 2
    assert "held out" in capsys.readouterr().err


def test_mapper_steps_follow_the_quality_presets():
    from emergent_seg.core import emerdiff

    def steps(**kw):
        s = V.emerdiff_settings(None, 512, **kw)
        return {"steps": s.denoise_steps, "difference": s.difference_mode}
    assert steps(quality="fast") == emerdiff.preset("fast")
    assert steps(quality="faithful") == emerdiff.preset("faithful")
    assert steps(steps=3) == steps(quality="fast", steps=3) == {"steps": 3, "difference": "symmetric"}
    with pytest.raises(EmergentSegError, match="unknown quality"):
        steps(quality="paper")   # one vocabulary: the presets' names only


def test_cli_eval_on_a_coco_folder_with_the_small_model(default_model, tmp_path):
    """512 px evaluation images, 64 px model input, labels resized back to 512 for scoring."""
    root = tmp_path / "coco"
    root.mkdir()
    (root / V.COCO_LIST).write_text("1\n2\n")
    rng = np.random.RandomState(0)
    for name in ("1", "2"):
        _save(root / "val2017" / f"{name}.jpg", rng.randint(0, 255, (48, 64, 3)).astype(np.uint8))
        fine = np.full((48, 64), 156, np.uint8)
        fine[20:, :] = 0
        _save(root / "annotation_val2017" / f"{name}.png", fine)
    out = tmp_path / "coco.md"
    assert cli.main(["eval", "--dataset", "coco-stuff-27", "--data", str(root), "--methods",
                     "diffseg-fast,one-segment", "--out", str(out), "--quiet"]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["meta"]["images"] == 2 and data["meta"]["num_classes"] == 27 and data["meta"]["model_size"] == SIZE
    assert "instance mIoU" not in out.read_text()
    one = data["rows"][1]
    assert one["per_image_acc"] > 0.5  # person fills most of the centre crop


def test_cli_eval_passes_method_settings_through(default_model, tmp_path):
    """The settings the README's evaluation variants use reach the run (and its JSON meta)."""
    out = tmp_path / "t.md"
    assert cli.main(["eval", "--scenes", "1", "--scene-seed", "7", "--methods", "diffseg-fast,emerdiff",
                     "--clusters", "2", "--steps", "fast-symmetric", "--sigma", "1.5", "--tau", "0.2",
                     "--out", str(out), "--quiet"]) == 0
    text = out.read_text()
    assert "K=2" in text and "mapper=fast-symmetric" in text and "sigma=1.50 px" in text
    assert "tau=0.2," in text and "seeds 7..7" in text


def test_demo_colours_the_truth_by_its_matched_segment():
    pred = torch.tensor([[0, 0, 1, 1], [2, 2, 1, 1]])
    truth = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0]])  # truth 1 overlaps pred 0 and 2; truth 0 = pred 1
    colours = cli.matched_colours(pred, truth)
    assert colours[0] == 1 and colours[1] in (0, 2)
    # more truth segments than predicted: the unmatched one gets a fresh index after the predictions
    assert sorted(cli.matched_colours(torch.zeros(2, 4, dtype=torch.long), truth)) == [0, 1]
    from emergent_seg.core.masks import render_overlay
    from emergent_seg.core.segmentation import Segmentation
    seg = Segmentation.from_labels(truth.unsqueeze(0))
    a = render_overlay(None, seg, colour_index=[[5, 6]])
    b = render_overlay(None, seg)
    assert not torch.equal(a, b)
    with pytest.raises(EmergentSegError, match="colour_index"):
        render_overlay(None, seg, colour_index=[[1]])


def test_calibrate_mapper_scores_presets_sigmas_and_the_upsampling_baselines(backend):
    scenes = make_scenes(1, V.CALIBRATION_SEED, SIZE)
    cal = V.calibrate_mapper(backend, scenes, k=2, qualities=("fast", "fast-symmetric"), sigmas=(0.0, 2.0))
    assert cal["mapper_quality"] in ("fast", "fast-symmetric") and cal["mapper_sigma"] in (0.0, 2.0)
    assert set(cal["mapper_candidates"]) == {"nearest", "bilinear", "fast:sigma=0", "fast:sigma=2",
                                             "fast-symmetric:sigma=0", "fast-symmetric:sigma=2"}
    best = max(v for key, v in cal["mapper_candidates"].items() if ":" in key)
    assert cal["mapper_score"] == pytest.approx(best, abs=1e-4)
    json.dumps(cal)
    with pytest.raises(EmergentSegError, match="training range"):
        V.calibrate_mapper(backend, make_scenes(1, EVAL_SEED, SIZE), k=2)


def test_calibrate_mapper_only_keeps_the_stored_threshold(fixture_dir, tmp_path):
    import shutil
    directory = tmp_path / "w"
    shutil.copytree(fixture_dir, directory)
    V.write_calibration(directory, {"tau": 0.5, "emerdiff_k": 2})
    assert V.main(["calibrate", "--weights", str(directory), "--scenes", "1", "--mapper-only", "--write",
                   "--quiet"]) == 0
    cal = json.loads((directory / "emergent_seg.json").read_text())["calibration"]
    assert cal["tau"] == 0.5 and cal["mapper_quality"] in ("fast", "fast-symmetric") and "mapper_sigma" in cal
    assert cal["mapper_scenes"]["k"] == 2


def test_diffseg_settings_for_a_model_use_its_stored_defaults(backend):
    from emergent_seg.core.pipeline import DiffSegSettings

    fake = type("B", (), {"calibration": {"tau": 0.07, "timestep": 250}})()
    s = DiffSegSettings.for_model(fake)
    assert (s.tau, s.tau_quantile, s.timestep) == (0.07, None, 250)
    s = DiffSegSettings.for_model(fake, tau_quantile=0.3, mode="parity")
    assert (s.tau, s.tau_quantile, s.mode) == (None, 0.3, "parity")
    assert DiffSegSettings.for_model(backend).tau == 1.1  # no stored tau: the paper's value
    with pytest.raises(EmergentSegError, match="iterations"):
        DiffSegSettings(iterations=0)
    with pytest.raises(EmergentSegError, match="tau must be > 0"):
        DiffSegSettings(tau=-1.0)


def test_cli_eval_resumes_from_per_image_records(default_model, tmp_path, capsys, monkeypatch):
    """The table comes from per-image records: a rerun replays them (nothing is recomputed and the
    table is identical), an image whose record is missing (a run cut short) is the only one
    computed again, and other options start over."""
    from emergent_seg.evaluation import methods as methods_mod

    out = tmp_path / "table.md"
    args = ["eval", "--scenes", "3", "--methods", "diffseg-fast,color-kmeans", "--out", str(out), "--quiet"]
    assert cli.main(args) == 0
    first, first_rows = out.read_text(), json.loads(out.with_suffix(".json").read_text())["rows"]
    records = sorted((tmp_path / "table_records").glob("*.safetensors"))
    assert len(records) == 3
    computed = []
    real = methods_mod._ImageRun.method

    def counting(self, m):
        computed.append((self.sample.name, m))
        return real(self, m)
    monkeypatch.setattr(methods_mod._ImageRun, "method", counting)
    capsys.readouterr()
    assert cli.main(args) == 0
    assert computed == [] and out.read_text() == first
    assert "replayed 3 image(s)" in capsys.readouterr().err
    records[1].unlink()
    assert cli.main(args) == 0
    assert {name for name, _ in computed} == {records[1].stem}
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    # the recomputed image's seconds may differ; every score is the same
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in rows] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in first_rows]
    computed.clear()
    assert cli.main(args[:-1] + ["--tau", "0.5", "--quiet"]) == 0
    assert len({name for name, _ in computed}) == 3
