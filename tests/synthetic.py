"""The planted attention scenes live in the package (``fixture/planted.py``) so benchmarks can use
them too; tests import them from here as before."""
from emergent_seg.fixture.planted import (  # noqa: F401
                                         planted_aggregate,
                                         random_aggregate,
                                         rect_regions,
                                         same_partition,
                                         voronoi_regions,
)
