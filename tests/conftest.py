import os
import sys
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every Ray listener on 127.0.0.1
os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).parent))

# The heaviest files first (measured: minutes each on 2 cores), in this order; every other file keeps pytest's
# order after them. With `--dist loadfile --no-loadscope-reorder` (the Makefile) pytest-xdist hands out whole
# files in this order, so the long files start at once on different workers and the short ones fill in around
# them; pytest-xdist's default reorder (files with the most tests first) queued the longest e2e file last.
HEAVY_FIRST = (
    "e2e/test_end_to_end.py",
    "integration/test_architectures.py",
    "integration/test_object_store.py",
    "integration/test_cache_cli.py",
    "integration/test_train_hardening.py",
    "integration/test_train.py",
    "integration/test_cache_stage.py",
    "integration/test_qad.py",
)


def _weight(nodeid: str) -> int:
    path = nodeid.split("::", 1)[0]
    return next((i for i, name in enumerate(HEAVY_FIRST) if path.endswith(name)), len(HEAVY_FIRST))


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: _weight(item.nodeid))  # stable: the order inside each file is kept
