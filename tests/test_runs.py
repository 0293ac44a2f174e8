"""Many-image ``segment`` runs: folders, globs and list files as inputs, and the manifest that
lets a rerun (after a crash, a Ctrl-C or a finished run) do only what is missing."""
import json
import os
import re

import numpy as np
import pytest
from PIL import Image
from test_cli import SIZE, model_dir  # noqa: F401  (module fixture)

from emergent_seg import cli, engines
from emergent_seg.core.errors import EmergentSegError
from emergent_seg.runs import MANIFEST_NAME, expand_inputs, output_stems

pytestmark = pytest.mark.usefixtures("one_thread")


def _image(path, colour):
    rgb = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    rgb[:, : SIZE // 2] = colour
    rgb[SIZE // 2:, SIZE // 2:] = (30, 180, 60)
    Image.fromarray(rgb).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    _image(root / "b.png", (200, 40, 30))
    _image(root / "a.jpg", (20, 40, 200))
    _image(root / "sub" / "a.png", (220, 220, 20))
    (root / "notes.txt").write_text("not an image")
    return root


def test_folders_globs_and_list_files_expand_in_order_once(folder, tmp_path):
    assert [p.name for p in expand_inputs([str(folder)])] == ["a.jpg", "b.png"]   # sorted, not recursive
    found = expand_inputs([str(folder / "**" / "*.png")])
    assert sorted(p.relative_to(folder).as_posix() for p in found) == ["b.png", "sub/a.png"]
    listing = tmp_path / "in" / "list.txt"
    listing.write_text("# chosen images\nsub/a.png\n\n" + str(folder / "b.png") + "\n")
    assert [p.relative_to(folder).as_posix() for p in expand_inputs(["@" + str(listing)])] == ["sub/a.png", "b.png"]
    # the same file named twice (folder and list) is segmented once
    both = expand_inputs([str(folder), "@" + str(listing)])
    assert [p.relative_to(folder).as_posix() for p in both] == ["a.jpg", "b.png", "sub/a.png"]


@pytest.mark.parametrize("item,needle", [("{empty}", "holds no images"), ("{root}/*.gif", "no image matches"),
                                         ("@{root}/missing.txt", "cannot read the list file")])
def test_inputs_that_name_nothing_are_one_line(folder, tmp_path, item, needle):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmergentSegError, match=needle):
        expand_inputs([item.format(empty=tmp_path / "empty", root=folder)])


def test_images_sharing_a_name_get_their_folder_in_the_output_name(folder):
    paths = [folder / "a.jpg", folder / "sub" / "a.png", folder / "b.png"]
    assert output_stems(paths) == ["in_a", "sub_a", "b"]


def run(model, out, *inputs_and_options):
    return cli.main(["segment", *map(str, inputs_and_options), "--model", str(model), "--out", str(out),
                     "--size", str(SIZE), "--device", "cpu", "--quiet"])


def done_stems(capsys):
    return re.findall(r"^(\S+): \d+ segments? ->", capsys.readouterr().out, flags=re.M)


def manifest(out):
    return [json.loads(line) for line in (out / MANIFEST_NAME).read_text().splitlines()]


def test_a_rerun_does_only_what_is_missing_or_changed(model_dir, folder, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    assert run(model_dir, out, folder) == 0
    assert done_stems(capsys) == ["a", "b"]
    records = manifest(out)
    assert [os.path.basename(r["input"]["path"]) for r in records] == ["a.jpg", "b.png"]
    first_labels = (out / "a_labels.png").read_bytes()
    for r in records:
        assert r["model"] and r["run_key"] and all((out / name).is_file() for name in r["outputs"])
        assert r["segments"] == len([n for n in r["outputs"] if "_seg" in n])

    assert run(model_dir, out, folder) == 0                      # everything done: nothing runs
    printed = capsys.readouterr().out
    assert "2 images already done" in printed and not re.search(r"^\S+: \d+ segment", printed, flags=re.M)
    assert len(manifest(out)) == 2

    (out / "b_seg00.png").unlink()                               # a missing output: that image again
    assert run(model_dir, out, folder) == 0
    assert done_stems(capsys) == ["b"]
    assert run(model_dir, out, folder) == 0                      # b's record after the torn line reads
    assert done_stems(capsys) == []
    assert (out / "a_labels.png").read_bytes() == first_labels

    os.utime(folder / "a.jpg", ns=(1, 1))                        # a changed input: that image again
    assert run(model_dir, out, folder) == 0
    assert done_stems(capsys) == ["a"]

    assert run(model_dir, out, folder, "--tau", "0.5") == 0      # other settings: everything again
    assert done_stems(capsys) == ["a", "b"]
    assert run(model_dir, out, folder, "--tau", "0.5", "--no-resume") == 0
    assert done_stems(capsys) == ["a", "b"]


def test_an_interrupted_run_resumes_with_the_unfinished_image(model_dir, folder, tmp_path, capsys, monkeypatch):  # noqa: F811
    out = tmp_path / "out"
    real = engines.write_outputs
    calls = []

    def dies_on_the_second(out_dir, stem, image, seg):
        calls.append(stem)
        if len(calls) == 2:
            real(out_dir, stem, image, seg)
            raise KeyboardInterrupt                              # files written, record not yet
        return real(out_dir, stem, image, seg)
    monkeypatch.setattr(engines, "write_outputs", dies_on_the_second)
    assert run(model_dir, out, folder) == 130
    assert [os.path.basename(r["input"]["path"]) for r in manifest(out)] == ["a.jpg"]
    monkeypatch.setattr(engines, "write_outputs", real)
    capsys.readouterr()
    assert run(model_dir, out, folder) == 0
    assert done_stems(capsys) == ["b"]
    assert run(model_dir, out, folder) == 0                      # b's record after the torn line reads
    assert done_stems(capsys) == []
    assert [os.path.basename(r["input"]["path"]) for r in manifest(out)] == ["a.jpg", "b.png"]


def test_a_torn_manifest_line_is_ignored(model_dir, folder, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    assert run(model_dir, out, folder / "a.jpg") == 0
    with open(out / MANIFEST_NAME, "a") as f:
        f.write('{"input": {"path": "x"')                        # a write cut short by a crash
    capsys.readouterr()
    assert run(model_dir, out, folder) == 0
    assert done_stems(capsys) == ["b"]
    assert run(model_dir, out, folder) == 0                      # b's record after the torn line reads
    assert done_stems(capsys) == []
