"""Many-image runs: batches of equal-size images, and the Ray engine on a local 2-CPU cluster.

The Ray tests start real local clusters (about 10 s each) and run the embedded model on a dozen
images: the same label maps, byte for byte, as the local engine, and a run killed midway resumes
with only the images it had not finished."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from emergent_seg import cli, engines
from emergent_seg.core.errors import EmergentSegError
from emergent_seg.engines import RayOptions, WorkItem, plan_batches, ray_layout
from emergent_seg.runs import MANIFEST_NAME

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "fixture" / "photos"


@pytest.fixture(scope="module")
def dozen(tmp_path_factory) -> Path:
    """Twelve images of four shapes: the seven photos, three scenes at 256 px and two crops."""
    from emergent_seg.core.images import read_image, save_png
    from emergent_seg.fixture.scenes import make_scenes

    folder = tmp_path_factory.mktemp("dozen")
    for photo in sorted(PHOTOS.glob("*.jpg")):
        (folder / photo.name).write_bytes(photo.read_bytes())
    for i, scene in enumerate(make_scenes(3, seed=2000, size=256)):
        save_png(scene.image.permute(1, 2, 0), folder / f"scene{i}.png")
    cat = read_image(PHOTOS / "cat.jpg")
    save_png(cat[:, :200, :300].permute(1, 2, 0), folder / "crop_a.png")
    save_png(cat[:, 40:240, 20:320].permute(1, 2, 0), folder / "crop_b.png")
    assert len(list(folder.iterdir())) == 12
    return folder


def segment(*argv: str) -> int:
    return cli.main(["segment", *argv, "--quiet"])


def labels_of(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*_labels.png"))}


def read_labels(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img)


def stems_done(text: str) -> list[str]:
    return sorted(line.split(":")[0] for line in text.splitlines() if " segment" in line and "->" in line)


@pytest.fixture(scope="module")
def local_run(dozen, tmp_path_factory) -> Path:
    """The reference: the local engine, one image per pass."""
    out = tmp_path_factory.mktemp("local")
    assert segment(str(dozen), "--out", str(out)) == 0
    assert len(labels_of(out)) == 12
    return out


# ------------------------------------------------------------------------------------ batches

def test_batches_put_equal_shapes_together_and_keep_order_within_a_shape(dozen):
    items = [WorkItem(p.stem, str(p)) for p in sorted(dozen.iterdir())]
    batches = plan_batches(items, 4)
    assert [len(b) for b in batches] == [4, 4, 4]
    flat = [w for b in batches for w in b]
    assert sorted(flat, key=lambda w: w.stem) == sorted(items, key=lambda w: w.stem)
    keys = [engines.shape_key(w.path) for w in flat]
    assert keys == sorted(keys)                          # one shape's images are contiguous
    scenes = [w.stem for w in flat if w.stem.startswith("scene")]
    assert scenes == ["scene0", "scene1", "scene2"]      # stable: input order within a shape
    assert plan_batches(items, 1) == [[w] for w in items]
    with pytest.raises(EmergentSegError, match="at least 1"):
        plan_batches(items, 0)


def test_a_batch_of_equal_sizes_is_one_unet_pass(monkeypatch):
    from emergent_seg.core import pipeline
    from emergent_seg.core.backends.loading import load_backend
    from emergent_seg.fixture.scenes import make_scenes

    backend = load_backend(None, "cpu")
    images = torch.stack([s.image for s in make_scenes(3, seed=5, size=256)])
    passes = []
    real = pipeline.capture_attention

    def counting(backend, latents, *a, **k):
        passes.append(int(latents.shape[0]))
        return real(backend, latents, *a, **k)
    monkeypatch.setattr(pipeline, "capture_attention", counting)
    batched = pipeline.segment_diffseg(backend, images, batch_size=3)
    assert passes == [3]
    single = pipeline.segment_diffseg(backend, images)
    assert passes == [3, 1, 1, 1]
    assert torch.equal(batched.labels, single.labels) and batched.counts == single.counts


def test_batched_segment_writes_what_single_image_runs_write(dozen, local_run, tmp_path, capsys):
    out = tmp_path / "batched"
    assert segment(str(dozen), "--out", str(out), "--batch-size", "4") == 0
    assert stems_done(capsys.readouterr().out) == sorted(p.stem for p in dozen.iterdir())
    # one pass over several images sums in another order than one pass per image: float rounding
    # may move a pixel on a segment boundary, nothing more
    for name, single in labels_of(local_run).items():
        a, b = read_labels(local_run / name), read_labels(out / name)
        assert a.shape == b.shape and a.max() == b.max(), name
        assert (a == b).mean() >= 0.999, (name, (a != b).mean())
    records = [json.loads(line) for line in (out / MANIFEST_NAME).read_text().splitlines()]
    assert len(records) == 12 and all(r["segments"] >= 1 for r in records)
    # the batch size is how the run executes, not what it computes: a rerun with another one resumes
    assert segment(str(dozen), "--out", str(out), "--batch-size", "2") == 0
    assert "12 images already done" in capsys.readouterr().out


def test_engine_options_are_checked_before_the_model_loads(dozen, tmp_path, capsys):
    for argv, message in ((["--batch-size", "0"], "--batch-size must be at least 1"),
                          (["--workers", "0"], "--workers must be at least 1"),
                          (["--cpus-per-worker", "0"], "--cpus-per-worker must be at least 1"),
                          (["--gpus-per-worker", "-1"], "--gpus-per-worker must be >= 0")):
        assert segment(str(dozen), "--out", str(tmp_path), *argv) == 2
        assert message in capsys.readouterr().err


def test_ray_layout_gives_one_worker_per_gpu_or_per_cpu_slot():
    assert ray_layout({"CPU": 2}, RayOptions()) == (1, 2, 0.0)
    assert ray_layout({"CPU": 16}, RayOptions()) == (4, 4, 0.0)
    assert ray_layout({"CPU": 16}, RayOptions(cpus_per_worker=1)) == (16, 1, 0.0)
    assert ray_layout({"CPU": 32, "GPU": 8}, RayOptions()) == (8, 1, 1.0)
    assert ray_layout({"CPU": 32, "GPU": 8}, RayOptions(gpus_per_worker=0.5)) == (16, 1, 0.5)
    assert ray_layout({"CPU": 32, "GPU": 8}, RayOptions(workers=2)) == (2, 1, 1.0)
    with pytest.raises(EmergentSegError, match="more than the cluster's 2 CPUs"):
        ray_layout({"CPU": 2}, RayOptions(cpus_per_worker=4))
    with pytest.raises(EmergentSegError, match="no GPUs"):
        ray_layout({"CPU": 2}, RayOptions(gpus_per_worker=1))


# ------------------------------------------------------------------------------------ Ray

RAY = ["--engine", "ray", "--cpus-per-worker", "2"]


@pytest.fixture(scope="module")
def ray_cluster():
    """A local 2-CPU cluster for the in-process runs (the engine joins it, never shuts it down)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def test_ray_engine_writes_the_local_engines_label_maps_byte_for_byte(dozen, local_run, ray_cluster, tmp_path,
                                                                     capsys):
    out, local = tmp_path / "ray", tmp_path / "local"
    assert segment(str(dozen), "--out", str(local), "--batch-size", "3") == 0
    assert segment(str(dozen), "--out", str(out), *RAY, "--batch-size", "3") == 0
    captured = capsys.readouterr()
    assert stems_done(captured.out) == sorted(2 * [p.stem for p in dozen.iterdir()])
    assert "Ray: 1 worker x 2 CPU, 4 batches" in captured.err
    assert labels_of(out) == labels_of(local)           # the same batches, the same bytes
    assert ray_cluster.is_initialized()                  # a cluster the run joined stays up
    # Ray and local runs resume each other's work: same manifest, same run key
    assert segment(str(dozen), "--out", str(out)) == 0
    assert "12 images already done" in capsys.readouterr().out


def test_ray_eval_scores_what_the_local_eval_scores(ray_cluster, tmp_path, capsys):
    base = ["eval", "--scenes", "4", "--methods", "diffseg", "--quiet"]
    local = cli.main([*base, "--out", str(tmp_path / "local.md")])
    assert local == 0
    on_ray = cli.main([*base, "--out", str(tmp_path / "ray.md"), *RAY, "--batch-size", "2"])
    assert on_ray == 0
    err = capsys.readouterr().err
    assert "evaluated 4/4 image(s) on Ray" in err and "replayed 4 image(s)" in err

    def scores(name: str) -> list:
        rows = json.loads((tmp_path / name).with_suffix(".json").read_text())["rows"]
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]
    assert scores("ray.md") == scores("local.md")


def test_a_killed_ray_run_resumes_with_only_the_missing_images(dozen, local_run, tmp_path):
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "emergent_seg", "segment", str(dozen), "--out", str(out), "--quiet", *RAY]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    manifest = out / MANIFEST_NAME
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if manifest.exists() and len(manifest.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)              # the driver and every Ray process it started
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read().decode()[-2000:]
    recorded = {Path(json.loads(line)["input"]["path"]).stem
                for line in manifest.read_text().splitlines() if line.endswith("}")}
    assert 3 <= len(recorded) < 12

    rerun = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    everything = {p.stem for p in dozen.iterdir()}
    assert stems_done(rerun.stdout) == sorted(everything - recorded)
    assert f"{len(recorded)} images already done" in rerun.stdout
    assert labels_of(out) == labels_of(local_run)


def test_ray_workers_get_absolute_paths_and_choose_their_own_device(dozen, tmp_path, monkeypatch):
    """A worker on another machine or in another folder must find the same files, and a GPU
    worker must not inherit a CPU-only driver's device."""
    seen = {}

    def fake_ray(options, batches, opts, on_start=None):
        seen.update(options=options, batches=batches, opts=opts)
        return iter(())
    monkeypatch.setattr(engines, "run_ray", fake_ray)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    model = ROOT / "fixture" / "weights"
    (tmp_path / "model" / "weights").symlink_to(model)
    assert segment(str(dozen), "--out", "relative/out", "--model", "model/weights", *RAY, "--workers", "1") == 0
    options = seen["options"]
    assert options["out"] == str(tmp_path / "relative" / "out")
    assert options["model"] == str(model.resolve())
    assert options["device"] is None
    assert seen["opts"] == RayOptions(None, 1, 2, None)
    assert sum(len(b) for b in seen["batches"]) == 12
