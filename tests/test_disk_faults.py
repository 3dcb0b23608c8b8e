"""A disk that fails: I/O errors and a full disk at any write end in one clear line, and a
filesystem without locking is refused in one line (faultfs, scripts/faultfs.py).

The campaigns (scripts/crash_test.py --disk-faults, --power-cut, --readers) are in
test_campaigns.py. Needs fuse3 and mfusepy: without them these tests fail, they do not skip.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import cli

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "faultfs.py"
_spec = importlib.util.spec_from_file_location("faultfs", SCRIPT)
assert _spec is not None and _spec.loader is not None
faultfs = sys.modules.get("faultfs") or importlib.util.module_from_spec(_spec)
if "faultfs" not in sys.modules:
    sys.modules["faultfs"] = faultfs
    _spec.loader.exec_module(faultfs)


def require_fuse() -> None:
    missing = faultfs.missing_prerequisites()
    assert not missing, f"faultfs needs {', '.join(missing)}: {faultfs.INSTALL_HINT}"


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[faultfs.FaultFS]:
    require_fuse()
    with faultfs.FaultFS(tmp_path / "backing", tmp_path / "mnt") as mounted:
        yield mounted


def test_filesystem_without_locking_is_refused_in_one_line(
    fs: faultfs.FaultFS, tmp_path: Path
) -> None:
    fs.no_flock()
    result = cli(["train", "data=sample", f"run.outputs={fs.mount / 'outputs'}"], tmp_path)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: The filesystem of ")
    assert "does not support file locking" in lines[0]
    assert "Put run.outputs on a local disk" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert "unexpected" not in result.stderr
    # `status` still reads the run (it cannot tell whether someone holds it).
    status = cli(["status", f"run.outputs={fs.mount / 'outputs'}", "--json"], tmp_path)
    assert status.returncode == 0, status.stderr
