import os
import sys
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every Ray listener on 127.0.0.1
os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).parent))


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test`: -n 2 --dist loadgroup) a test file runs on one worker (its module
    fixtures are built once), and both end-to-end files share one worker: each runs a whole pipeline on its
    own Ray cluster, and two at once on 2 cores slow each other past their timeouts."""
    import pytest

    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            path = Path(str(item.fspath))
            group = "e2e" if path.parent.name == "e2e" else f"{path.parent.name}/{path.stem}"
            item.add_marker(pytest.mark.xdist_group(group))
