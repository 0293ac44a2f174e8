"""The README's Python API example runs as written (with a real image path substituted), as a
script in its own interpreter."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def api_examples() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):text.index("\n## ", text.index("## Python API") + 5)]
    blocks, start = [], 0
    while "```python" in section[start:]:
        begin = section.index("```python", start) + len("```python")
        end = section.index("```", begin)
        blocks.append(section[begin:end])
        start = end + 3
    return blocks


def test_one_call_api_example_runs(tmp_path):
    code = api_examples()[0]
    assert '"photo.jpg"' in code
    code = code.replace('"photo.jpg"', repr(str(ROOT / "fixture" / "photos" / "cat.jpg")))
    code += ("\nprint('RESULT', tuple(result.labels.shape), tuple(result.masks.shape), result.count, "
             "tuple(result.overlay.shape), len(result.words), sharp.segmentation.method)\n")
    script = tmp_path / "one_call.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT"))
    import re

    nums = [int(v) for v in re.findall(r"\d+", line)]
    from PIL import Image

    width, height = Image.open(ROOT / "fixture" / "photos" / "cat.jpg").size
    labels_hw, masks_shape, count = tuple(nums[0:2]), tuple(nums[2:5]), nums[5]
    assert labels_hw == (height, width)                  # the photo's own size, not the model's
    assert masks_shape == (count, height, width) and count >= 1
    assert tuple(nums[6:9]) == (height, width, 3) and nums[9] == count
    assert line.split()[-1] == "emerdiff"


def test_python_api_example_runs(tmp_path):
    code = api_examples()[1]
    assert '"photo.jpg"' in code
    code = code.replace('"photo.jpg"', repr(str(ROOT / "fixture" / "photos" / "cat.jpg")))
    code += "\nprint('RESULT', tuple(seg.labels.shape), tuple(image.shape[-2:]), seg.counts[0], seg2.method)\n"
    script = tmp_path / "example.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT"))
    shape, hw, count, method = parse_result(line)
    assert shape[1:] == hw and count >= 1 and method == "emerdiff"


def parse_result(line: str) -> tuple:
    """``RESULT (1, H, W) (H, W) N method`` -> ``((1, H, W), (H, W), N, method)``."""
    import re

    nums = [int(v) for v in re.findall(r"\d+", line)]
    return (tuple(nums[0:3]), tuple(nums[3:5]), nums[5], line.split()[-1])
