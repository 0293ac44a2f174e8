import os
import sys

import pytest
import torch

# The repository root is the package `emergent_seg`; make it importable without installation.
_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if "emergent_seg" not in sys.modules:
    try:
        import emergent_seg  # noqa: F401  (installed, e.g. pip install -e .)
    except ImportError:
        import importlib.util
        spec = importlib.util.spec_from_file_location("emergent_seg", os.path.join(_root, "__init__.py"),
                                                      submodule_search_locations=[_root])
        module = importlib.util.module_from_spec(spec)
        sys.modules["emergent_seg"] = module
        spec.loader.exec_module(module)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): the
    tiny models' ops are too small to gain from a second thread, and on a shared 2-core machine
    OpenMP's spin-waiting second thread makes them many times slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
