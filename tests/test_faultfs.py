"""scripts/faultfs.py: the power-cut / failing-disk FUSE filesystem, checked with plain file I/O.

Needs fuse3 (apt) and mfusepy (pip); without them these tests fail, they do not skip.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import faultfs

SCRIPT = Path(faultfs.__file__)

FaultFS = faultfs.FaultFS


def require_fuse() -> None:
    missing = faultfs.missing_prerequisites()
    assert not missing, f"faultfs needs {', '.join(missing)}: {faultfs.INSTALL_HINT}"


def _mount(tmp_path: Path, model: str = "strict") -> Iterator[FaultFS]:
    require_fuse()
    mnt = tmp_path / "mnt"
    with FaultFS(tmp_path / "backing", mnt, model=model) as fs:
        yield fs
    assert faultfs.mount_entry(mnt) is None, "faultfs left a stale mount"


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[FaultFS]:
    yield from _mount(tmp_path)


# ----- plain-Python helpers --------------------------------------------------------------


def write(path: Path, data: bytes, fsync: bool = False, mode: str = "wb") -> None:
    with open(path, mode) as handle:
        handle.write(data)
        handle.flush()
        if fsync:
            os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_file(path: Path, data: bytes) -> None:
    write(path, data, fsync=True)
    fsync_dir(path.parent)


# ----- scenarios (each a function of the mount point, so a broken model can be run too) ----


def scenario_unsynced_write_lost(fs: FaultFS) -> None:
    m = fs.mount
    durable_file(m / "a", b"v1")
    write(m / "a", b"v1+v2", mode="wb")  # closed, never fsynced
    write(m / "never", b"x")
    fsync_dir(m)  # makes `never` exist, but its data was never fsynced
    fs.cut()
    assert (m / "a").read_bytes() == b"v1"
    assert (m / "never").read_bytes() == b""


def scenario_new_file_needs_dir_fsync(fs: FaultFS) -> None:
    m = fs.mount
    write(m / "f", b"data", fsync=True)
    fs.cut()
    assert not (m / "f").exists(), "fsync of a file must not persist its directory entry"


def scenario_rename_needs_dir_fsync(fs: FaultFS) -> None:
    m = fs.mount
    durable_file(m / "x", b"old x")
    os.rename(m / "x", m / "y")
    write(m / "y", b"new y", fsync=True)
    fs.cut()
    assert sorted(os.listdir(m)) == ["x"]
    assert (m / "x").read_bytes() == b"new y"  # same inode: its fsynced data, old name


def test_unsynced_write_disappears(fs: FaultFS) -> None:
    scenario_unsynced_write_lost(fs)
    summary_after = fs.stats()
    assert summary_after["cuts"][-1]["dropped_data"] == 2  # /a and /never


def test_fsynced_write_survives(fs: FaultFS) -> None:
    m = fs.mount
    durable_file(m / "a", b"hello")
    write(m / "b", b"world" * 1000, fsync=True)
    fsync_dir(m)
    summary = fs.cut()
    assert summary["dropped_data"] == [] and summary["dropped_dirs"] == []
    assert (m / "a").read_bytes() == b"hello"
    assert (m / "b").read_bytes() == b"world" * 1000


def test_new_file_survives_only_after_dir_fsync(fs: FaultFS) -> None:
    scenario_new_file_needs_dir_fsync(fs)
    m = fs.mount
    write(m / "f", b"data", fsync=True)
    fsync_dir(m)
    fs.cut()
    assert (m / "f").read_bytes() == b"data"


def test_rename_survives_only_after_dir_fsync(fs: FaultFS) -> None:
    scenario_rename_needs_dir_fsync(fs)
    m = fs.mount
    os.rename(m / "x", m / "z")
    fsync_dir(m)
    fs.cut()
    assert sorted(os.listdir(m)) == ["z"]
    assert (m / "z").read_bytes() == b"new y"


def test_replace_over_durable_file(fs: FaultFS) -> None:
    m = fs.mount
    durable_file(m / "final", b"old")
    write(m / "tmp", b"new", fsync=True)
    os.replace(m / "tmp", m / "final")
    fs.cut()
    assert sorted(os.listdir(m)) == ["final"]
    assert (m / "final").read_bytes() == b"old"


def test_unlink_survives_only_after_dir_fsync(fs: FaultFS) -> None:
    m = fs.mount
    durable_file(m / "u", b"keep me")
    os.unlink(m / "u")
    summary = fs.cut()
    assert summary["dropped_dirs"] == [{"path": "/", "added": [], "removed": ["u"]}]
    assert (m / "u").read_bytes() == b"keep me"
    os.unlink(m / "u")
    fsync_dir(m)
    fs.cut()
    assert not (m / "u").exists()


def test_overwrite_comes_back_with_fsynced_content(fs: FaultFS) -> None:
    m = fs.mount
    durable_file(m / "o", b"AAAAAAAA")
    write(m / "o", b"BB", fsync=True)  # O_TRUNC + write + fsync
    write(m / "o", b"CCCCCCCCCCCC")  # not fsynced
    fs.cut()
    assert (m / "o").read_bytes() == b"BB"


def test_truncation(fs: FaultFS) -> None:
    m = fs.mount
    durable_file(m / "t", b"a" * 100)
    os.truncate(m / "t", 10)
    fs.cut()
    assert (m / "t").read_bytes() == b"a" * 100
    with open(m / "t", "r+b") as handle:
        handle.truncate(10)  # ftruncate
        handle.seek(50)
        handle.write(b"zz")
        handle.seek(2)
        handle.write(b"M")
        handle.flush()
        os.fsync(handle.fileno())
    expected = b"aaMaaaaaaa" + b"\0" * 40 + b"zz"
    assert (m / "t").read_bytes() == expected
    with open(m / "t", "r+b") as handle:  # volatile shrink, then a cut
        handle.truncate(0)
    fs.cut()
    assert (m / "t").read_bytes() == expected


def test_nested_mkdir_needs_every_parent(fs: FaultFS) -> None:
    m = fs.mount
    (m / "a" / "b" / "c").mkdir(parents=True)
    durable_file(m / "a" / "b" / "c" / "f", b"deep")
    fsync_dir(m / "a" / "b")
    fsync_dir(m / "a")  # the root is not fsynced: `a` is not durable
    fs.cut()
    assert os.listdir(m) == []
    (m / "a" / "b" / "c").mkdir(parents=True)
    durable_file(m / "a" / "b" / "c" / "f", b"deep")
    fsync_dir(m)
    fsync_dir(m / "a")  # b is not fsynced: c is not durable in it
    fs.cut()
    assert os.listdir(m / "a" / "b") == []
    (m / "a" / "b" / "c").mkdir()
    durable_file(m / "a" / "b" / "c" / "f", b"deep")
    fsync_dir(m / "a" / "b")
    fs.cut()
    assert (m / "a" / "b" / "c" / "f").read_bytes() == b"deep"


def test_durable_write_recipe_at_each_point(fs: FaultFS) -> None:
    m = fs.mount
    (m / "d").mkdir()
    durable_file(m / "d" / "ckpt", b"old")
    fsync_dir(m)
    steps = ["write", "fsync", "rename", "fsync_dir"]
    for stop, step in enumerate(steps):
        tmp, final = m / "d" / "ckpt.tmp", m / "d" / "ckpt"
        handle = open(tmp, "wb")
        handle.write(b"new")
        handle.flush()
        if stop >= 1:
            os.fsync(handle.fileno())
        handle.close()
        if stop >= 2:
            os.replace(tmp, final)
        if stop >= 3:
            fsync_dir(m / "d")
        fs.cut()
        want = b"new" if step == "fsync_dir" else b"old"
        assert sorted(os.listdir(m / "d")) == ["ckpt"], step
        assert final.read_bytes() == want, step
        durable_file(final, b"old")


def test_hardlink_symlink_and_cross_directory_replace(fs: FaultFS) -> None:
    m = fs.mount
    (m / "src").mkdir()
    (m / "dst").mkdir()
    durable_file(m / "src" / "f", b"f")
    os.link(m / "src" / "f", m / "src" / "g")
    os.symlink("f", m / "src" / "s")
    fsync_dir(m / "src")
    fsync_dir(m)
    fs.cut()
    assert os.stat(m / "src" / "f").st_ino == os.stat(m / "src" / "g").st_ino
    assert os.readlink(m / "src" / "s") == "f"
    assert (m / "src" / "s").read_bytes() == b"f"
    os.replace(m / "src" / "f", m / "dst" / "f")  # cross-directory rename works live
    assert (m / "dst" / "f").read_bytes() == b"f"
    fsync_dir(m / "dst")
    fsync_dir(m / "src")
    fs.cut()
    assert sorted(os.listdir(m / "src")) == ["g", "s"]
    assert (m / "dst" / "f").read_bytes() == b"f"


def test_seeded_cut_keeps_or_drops_each_item(fs: FaultFS) -> None:
    m = fs.mount
    outcomes = set()
    for seed in range(6):
        durable_file(m / "a", b"old")
        write(m / "a", b"new")  # volatile data
        write(m / "b", b"b", fsync=True)  # pending entry
        summary = fs.cut(seed=seed)
        a = (m / "a").read_bytes()
        b = (m / "b").read_bytes() if (m / "b").exists() else None
        assert a in (b"old", b"new") and b in (b"b", None)
        assert (a == b"new") == (summary["kept_data"] == ["/a"])
        outcomes.add((a, b))
        if (m / "b").exists():
            os.unlink(m / "b")
            fsync_dir(m)
    assert len(outcomes) > 1, "a seeded cut should not always make the same choice"


def test_eio_on_nth_write_and_enospc_on_fsync(fs: FaultFS) -> None:
    m = fs.mount
    fs.fault("write", "/data/*.bin", "EIO", nth=2)
    (m / "data").mkdir()
    fsync_dir(m)
    fd = os.open(m / "data" / "x.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"1")
        with pytest.raises(OSError) as err:
            os.write(fd, b"2")
        assert err.value.errno == errno.EIO
        os.write(fd, b"3")  # once only
    finally:
        os.close(fd)
    write(m / "data" / "other.txt", b"not matched")
    assert (m / "data" / "x.bin").read_bytes() == b"13"

    durable_file(m / "data" / "x.bin", b"durable")
    fs.fault("fsync", "/data/x.bin", "ENOSPC")
    with open(m / "data" / "x.bin", "wb") as handle:
        handle.write(b"lost")
        handle.flush()
        with pytest.raises(OSError) as err:
            os.fsync(handle.fileno())
        assert err.value.errno == errno.ENOSPC
    fs.fault("write", "re:never\\.txt$", "ENOSPC", nth=1, every=True)
    fd = os.open(m / "never.txt", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for _ in range(2):
            with pytest.raises(OSError) as err:
                os.write(fd, b"x")
            assert err.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    stats = fs.stats()
    assert stats["faults_injected"] == 4
    assert stats["ops"]["write"] >= 5
    fs.cut()
    assert (m / "data" / "x.bin").read_bytes() == b"durable"  # the failed fsync persisted nothing
    assert fs.stats()["faults"][0]["injected"] == 1  # rules survive the remount
    fs.clear_faults()
    write(m / "never.txt", b"ok")


def test_flock_refused_and_working(fs: FaultFS) -> None:
    m = fs.mount
    write(m / "lock", b"")
    with open(m / "lock", "rb") as one, open(m / "lock", "rb") as two:
        fcntl.flock(one, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(BlockingIOError):
            fcntl.flock(two, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(one, fcntl.LOCK_UN)
        fcntl.flock(two, fcntl.LOCK_SH)
    for name, code in (("ENOLCK", errno.ENOLCK), ("EOPNOTSUPP", errno.EOPNOTSUPP)):
        fs.no_flock(True, name)
        with open(m / "lock", "rb") as handle, pytest.raises(OSError) as err:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert err.value.errno == code
    fs.no_flock(False)
    with open(m / "lock", "rb") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)


def test_killed_user_then_cut_and_numpy_workload(fs: FaultFS) -> None:
    m = fs.mount
    arrays = {"w": np.arange(300_000, dtype=np.float32), "b": np.ones(10)}
    with open(m / "weights.npz.tmp", "wb") as handle:
        np.savez(handle, **arrays)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(m / "weights.npz.tmp", m / "weights.npz")
    fsync_dir(m)
    np.save(m / "volatile.npy", np.zeros(5))
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; f = open(sys.argv[1], 'ab'); time.sleep(60)"]
        + [str(m / "held")],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not (m / "held").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        assert fs.kill_users() == [child.pid]
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    fs.cut()
    assert sorted(os.listdir(m)) == ["weights.npz"]
    with np.load(m / "weights.npz") as loaded:
        assert all(np.array_equal(loaded[k], v) for k, v in arrays.items())
    mapped = np.lib.format.open_memmap(m / "map.npy", mode="w+", dtype=np.int64, shape=(1000,))
    mapped[:] = 7
    mapped.flush()
    del mapped
    with open(m / "map.npy", "rb+") as handle:
        os.fsync(handle.fileno())
    fsync_dir(m)
    fs.cut()
    assert int(np.load(m / "map.npy", mmap_mode="r").sum()) == 7000
    assert fs.stats()["totals"]["write"] > 0


def test_no_stale_mount_when_owner_dies(tmp_path: Path) -> None:
    require_fuse()
    mnt = tmp_path / "mnt"
    code = (
        "import importlib.util, os, sys\n"
        f"spec = importlib.util.spec_from_file_location('faultfs', {str(SCRIPT)!r})\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules['faultfs'] = mod\n"
        "spec.loader.exec_module(mod)\n"
        f"mod.FaultFS({str(tmp_path / 'b')!r}, {str(mnt)!r}).start()\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    deadline = time.monotonic() + 10
    while faultfs.mount_entry(mnt) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert faultfs.mount_entry(mnt) is None, "the daemon did not unmount after its owner died"


BROKEN_MODEL_CATCHES: list[Callable[[FaultFS], None]] = [
    scenario_unsynced_write_lost,
    scenario_new_file_needs_dir_fsync,
    scenario_rename_needs_dir_fsync,
]


def test_a_broken_model_fails_these_checks(tmp_path: Path) -> None:
    """With --model sync (a cut loses nothing) each scenario above must fail its asserts."""
    for number, scenario in enumerate(BROKEN_MODEL_CATCHES):
        for fs in _mount(tmp_path / str(number), model="sync"):
            with pytest.raises(AssertionError):
                scenario(fs)
