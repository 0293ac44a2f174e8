"""Safetensors only, on every loading path: a model saved as pickle is refused with one line that
names the file and the fix (exit code 2 on the command line) and nothing is loaded; the same model
saved as safetensors loads. A scan of the source checks that every library loader call asks for
safetensors."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from emergent_seg import cli
from emergent_seg.core.backends import loading
from emergent_seg.core.errors import EmergentSegError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def safe_folder(tmp_path_factory) -> Path:
    from mini_sd import save_random_mini_sd
    return save_random_mini_sd(tmp_path_factory.mktemp("safe"), seed=5)


def _pickle_copy(safe: Path, tmp: Path, part: str) -> Path:
    """A copy of ``safe`` whose ``part`` holds the same weights as a pickle file only."""
    folder = tmp / f"pickle_{part}"
    shutil.copytree(safe, folder)
    from safetensors.torch import load_file

    target = folder / part
    (name,) = [p for p in target.glob("*.safetensors")]
    state = load_file(str(name))
    name.unlink()
    suffix = ".bin"
    torch.save(state, target / (name.stem + suffix))
    return folder


def test_safetensors_folder_loads(safe_folder):
    backend = loading.load_backend(safe_folder)
    assert backend.vae is not None and backend.encode_prompt("a cat").context.shape[0] == 1


@pytest.mark.parametrize("part", ["unet", "vae", "text_encoder"])
def test_pickle_only_component_is_refused(safe_folder, tmp_path, part, capsys, monkeypatch):
    folder = _pickle_copy(safe_folder, tmp_path, part)
    opened: list[str] = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: opened.append(str(a[0])) or real_load(*a, **k))
    with pytest.raises(EmergentSegError) as err:
        loading.load_backend(folder)
    message = str(err.value)
    assert "\n" not in message and "pickle" in message and "convert it to safetensors" in message
    assert f"{part}/diffusion_pytorch_model.bin" in message or f"{part}/model.bin" in message
    assert opened == []  # nothing was unpickled
    image = tmp_path / "x.png"
    from emergent_seg.core.images import save_png
    save_png(torch.rand(64, 64, 3), image)
    assert cli.main(["segment", str(image), "--model", str(folder), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err_text = capsys.readouterr().err
    assert err_text.count("\n") == 1 and "convert it to safetensors" in err_text
    assert not any((tmp_path / "o").iterdir())  # checked to be writable, nothing written


def test_clip_text_encoder_folder_with_pickle_is_refused_before_transformers(safe_folder, tmp_path):
    """An SD-style folder whose CLIP text encoder is ``pytorch_model.bin``: refused by name, even
    where transformers is not installed (the refusal comes first)."""
    folder = tmp_path / "clip"
    shutil.copytree(safe_folder, folder)
    shutil.rmtree(folder / "text_encoder")
    (folder / "text_encoder").mkdir()
    (folder / "text_encoder" / "config.json").write_text('{"architectures": ["CLIPTextModel"]}')
    torch.save({"w": torch.zeros(1)}, folder / "text_encoder" / "pytorch_model.bin")
    with pytest.raises(EmergentSegError, match=r"text_encoder/pytorch_model\.bin is a pickle checkpoint"):
        loading.load_backend(folder)


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "model.bin", "model.pth"])
def test_single_file_pickle_is_refused(tmp_path, name, capsys):
    path = tmp_path / name
    torch.save({"w": torch.zeros(1)}, path)
    image = tmp_path / "x.png"
    from emergent_seg.core.images import save_png
    save_png(torch.rand(64, 64, 3), image)
    assert cli.main(["segment", str(image), "--model", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "pickle checkpoint" in err and "safetensors" in err and err.count("\n") == 1


def test_corrupt_safetensors_single_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(EmergentSegError, match="not a readable .safetensors file"):
        loading.read_safetensors(path)
    image = tmp_path / "x.png"
    from emergent_seg.core.images import save_png
    save_png(torch.rand(64, 64, 3), image)
    assert cli.main(["segment", str(image), "--model", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "broken.safetensors" in err


def _calls(text: str, name: str) -> list[str]:
    """The full text of every ``.<name>(`` call in ``text`` (parentheses balanced)."""
    out = []
    for match in re.finditer(rf"\.{name}\(", text):
        depth, i = 1, match.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        out.append(text[match.start():i])
    return out


def test_every_library_loader_call_asks_for_safetensors():
    skip = {"tests", ".git", "build", "dist", "node_modules"}
    sources = [p for p in ROOT.rglob("*.py") if not skip & set(p.relative_to(ROOT).parts)]
    pretrained = single = 0
    for path in sources:
        text = path.read_text()
        for call in _calls(text, "from_pretrained"):
            if call.startswith(".from_pretrained(folder, use_safetensors=True"):
                pretrained += 1
                continue
            assert "use_safetensors=True" in call, f"{path.relative_to(ROOT)}: {call}"
            pretrained += 1
        for call in _calls(text, "from_single_file"):
            # the file was read by safetensors (read_safetensors) and is passed as a state dict
            assert call.startswith(".from_single_file(weights,"), f"{path.relative_to(ROOT)}: {call}"
            assert "weights = read_safetensors(path)" in text
            single += 1
    assert pretrained >= 3 and single == 2
