"""The README's Python API example runs as written (with a real image path substituted), as a
script in its own interpreter."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_python_api_example_runs(tmp_path):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    start = section.index("```python") + len("```python")
    code = section[start:section.index("```", start)]
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
