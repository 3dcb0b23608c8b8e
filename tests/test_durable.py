"""pipeline.durable: atomic files and directories, manifests, failpoints, disk-full errors."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline import durable
from pipeline.errors import PipelineError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def fresh_failpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    """Failpoint hit counts are per process; start every test from zero and without a spec."""
    monkeypatch.delenv("PIPELINE_FAILPOINT", raising=False)
    monkeypatch.setattr(durable, "_failpoint_hits", {})


def names(directory: Path) -> list[str]:
    """Every entry under `directory` (hidden ones included), relative, sorted."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


# ---------------------------------------------------------------- single files


def test_temp_name_keeps_suffix_and_is_hidden() -> None:
    pid = os.getpid()
    assert durable.temp_name(Path("/r/model.keras")) == Path(f"/r/.model.tmp-{pid}.keras")
    assert durable.temp_name(Path("/r/run.json")) == Path(f"/r/.run.tmp-{pid}.json")
    assert durable.temp_name(Path("/r/LOCK")) == Path(f"/r/.LOCK.tmp-{pid}")


def test_write_bytes_creates_parents_and_leaves_only_the_file(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "blob.bin"
    durable.write_bytes(target, b"\x00\x01hello")
    assert target.read_bytes() == b"\x00\x01hello"
    assert names(tmp_path) == ["a", "a/b", "a/b/blob.bin"]


def test_write_bytes_replaces_existing_content(tmp_path: Path) -> None:
    target = tmp_path / "blob.bin"
    durable.write_bytes(target, b"old content that is longer")
    durable.write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert names(tmp_path) == ["blob.bin"]


def test_failing_writer_keeps_old_file_and_removes_temp(tmp_path: Path) -> None:
    target = tmp_path / "blob.bin"
    target.write_bytes(b"good")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise ValueError("writer broke")

    with pytest.raises(ValueError, match="^writer broke$"):
        durable.write_file(target, half_then_fail)
    assert target.read_bytes() == b"good"
    assert names(tmp_path) == ["blob.bin"]


def test_permission_error_becomes_pipeline_error(tmp_path: Path) -> None:
    target = tmp_path / "blob.bin"

    def denied(tmp: Path) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    with pytest.raises(PipelineError) as info:
        durable.write_file(target, denied)
    assert type(info.value) is PipelineError
    assert str(info.value) == (
        f"Cannot write {target}: Permission denied. Make the directory "
        "writable or choose another one with run.outputs=..."
    )
    assert names(tmp_path) == []


def test_enospc_from_writer_becomes_disk_full_with_size_hint(tmp_path: Path) -> None:
    target = tmp_path / "blob.bin"

    def full(tmp: Path) -> None:
        tmp.write_bytes(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(durable.DiskFullError) as info:
        durable.write_file(target, full, size_hint=3_250_000)
    message = str(info.value)
    assert message.startswith(f"No space left writing {target}: it needs 3.2 MB, ")
    assert message.endswith(
        "MB are free. Free some disk space (or raise the file-size limit) "
        "and run the same command again; nothing committed was lost."
    )
    assert isinstance(info.value, PipelineError) and info.value.exit_code == 1
    assert names(tmp_path) == []


def test_other_oserror_passes_through_unchanged(tmp_path: Path) -> None:
    def io_error(tmp: Path) -> None:
        raise OSError(errno.EIO, "I/O error")

    with pytest.raises(OSError) as info:
        durable.write_file(tmp_path / "x", io_error)
    assert type(info.value) is OSError and info.value.errno == errno.EIO
    assert names(tmp_path) == []


# ---------------------------------------------------------------- checksummed records


def test_record_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "rec.json"
    payload = {"b": [1, 2.5, None], "a": {"nested": "é"}}
    durable.write_record(path, payload)
    assert durable.read_record(path) == payload
    outer = json.loads(path.read_text())
    assert sorted(outer) == ["data", "sha256"]
    body = json.dumps(payload, sort_keys=True, indent=1)
    assert outer["sha256"] == hashlib.sha256(body.encode()).hexdigest()


def test_record_with_changed_value_fails_checksum(tmp_path: Path) -> None:
    path = tmp_path / "rec.json"
    durable.write_record(path, {"step": 10})
    outer = json.loads(path.read_text())
    outer["data"]["step"] = 11
    path.write_text(json.dumps(outer))
    with pytest.raises(durable.CorruptArtifact, match=r"^.*rec\.json: checksum mismatch$"):
        durable.read_record(path)


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: raw[: len(raw) // 2],  # truncated JSON
        lambda raw: b"",  # empty file
        lambda raw: json.dumps({"data": {"step": 1}}).encode(),  # no checksum
        lambda raw: b"[1, 2]",  # wrong JSON type
    ],
)
def test_unreadable_record(tmp_path: Path, damage) -> None:
    path = tmp_path / "rec.json"
    durable.write_record(path, {"step": 10})
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(durable.CorruptArtifact) as info:
        durable.read_record(path)
    assert str(info.value).startswith(f"{path}: unreadable record (")


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "big"
    data = os.urandom((1 << 20) + 17)  # more than one read block
    path.write_bytes(data)
    assert durable.sha256_file(path) == hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- committed directories


def fill_two(tmp: Path) -> None:
    (tmp / "a.bin").write_bytes(b"12345")
    (tmp / "sub").mkdir()
    (tmp / "sub" / "b.txt").write_bytes(b"hello")


def test_write_dir_commits_files_and_manifest(tmp_path: Path) -> None:
    final = tmp_path / "ckpt"
    durable.write_dir(final, fill_two, {"step": 7})
    assert names(tmp_path) == [
        "ckpt",
        "ckpt/MANIFEST.json",
        "ckpt/a.bin",
        "ckpt/sub",
        "ckpt/sub/b.txt",
    ]
    manifest = durable.read_record(final / durable.MANIFEST)
    assert manifest == {
        "meta": {"step": 7},
        "files": {
            "a.bin": {"size": 5, "sha256": hashlib.sha256(b"12345").hexdigest()},
            "sub/b.txt": {"size": 5, "sha256": hashlib.sha256(b"hello").hexdigest()},
        },
    }
    assert durable.verify_dir(final) == {"step": 7}


def test_write_dir_without_meta_records_empty_meta(tmp_path: Path) -> None:
    durable.write_dir(tmp_path / "d", lambda tmp: (tmp / "f").write_bytes(b""))
    assert durable.verify_dir(tmp_path / "d") == {}


def test_write_dir_failing_fill_leaves_nothing(tmp_path: Path) -> None:
    def broken(tmp: Path) -> None:
        (tmp / "a.bin").write_bytes(b"123")
        raise RuntimeError("fill broke")

    with pytest.raises(RuntimeError, match="^fill broke$"):
        durable.write_dir(tmp_path / "ckpt", broken)
    assert names(tmp_path) == []


def test_write_dir_enospc_in_fill_reports_size_written(tmp_path: Path) -> None:
    def full(tmp: Path) -> None:
        (tmp / "a.bin").write_bytes(b"x" * 1_500_000)
        raise OSError(errno.ENOSPC, "No space left on device")

    final = tmp_path / "ckpt"
    with pytest.raises(durable.DiskFullError) as info:
        durable.write_dir(final, full)
    assert str(info.value).startswith(f"No space left writing {final}: it needs 1.5 MB, ")
    assert names(tmp_path) == []


def test_write_dir_does_not_clobber_a_committed_directory(tmp_path: Path) -> None:
    final = tmp_path / "ckpt"
    durable.write_dir(final, fill_two, {"v": 1})
    with pytest.raises(OSError) as info:
        durable.write_dir(final, lambda tmp: (tmp / "other").write_bytes(b"x"), {"v": 2})
    assert info.value.errno in (errno.ENOTEMPTY, errno.EEXIST)
    assert durable.verify_dir(final) == {"v": 1}
    assert names(tmp_path) == [
        "ckpt",
        "ckpt/MANIFEST.json",
        "ckpt/a.bin",
        "ckpt/sub",
        "ckpt/sub/b.txt",
    ]


def test_verify_dir_without_manifest(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(durable.CorruptArtifact) as info:
        durable.verify_dir(tmp_path / "d")
    assert str(info.value) == f"{tmp_path / 'd'}: no MANIFEST.json (incomplete write)"


def test_verify_dir_missing_file(tmp_path: Path) -> None:
    final = tmp_path / "d"
    durable.write_dir(final, fill_two)
    (final / "sub" / "b.txt").unlink()
    with pytest.raises(durable.CorruptArtifact) as info:
        durable.verify_dir(final)
    assert str(info.value) == f"{final / 'sub' / 'b.txt'}: missing"


def test_verify_dir_truncated_file(tmp_path: Path) -> None:
    final = tmp_path / "d"
    durable.write_dir(final, fill_two)
    (final / "a.bin").write_bytes(b"123")
    with pytest.raises(durable.CorruptArtifact) as info:
        durable.verify_dir(final)
    assert str(info.value) == f"{final / 'a.bin'}: size 3, expected 5 (truncated?)"


def test_verify_dir_flipped_byte(tmp_path: Path) -> None:
    final = tmp_path / "d"
    durable.write_dir(final, fill_two)
    (final / "a.bin").write_bytes(b"12335")
    with pytest.raises(durable.CorruptArtifact) as info:
        durable.verify_dir(final)
    assert str(info.value) == f"{final / 'a.bin'}: sha256 mismatch (corrupted)"


def test_verify_dir_tampered_manifest(tmp_path: Path) -> None:
    final = tmp_path / "d"
    durable.write_dir(final, fill_two, {"step": 1})
    manifest = final / durable.MANIFEST
    manifest.write_bytes(manifest.read_bytes().replace(b'"step": 1', b'"step": 2'))
    with pytest.raises(durable.CorruptArtifact, match="checksum mismatch$"):
        durable.verify_dir(final)


# ---------------------------------------------------------------- set_aside and remove_temps


def test_set_aside_numbers_repeated_evidence(tmp_path: Path) -> None:
    moved = []
    for content in (b"one", b"two", b"three"):
        bad = tmp_path / "step-1"
        bad.mkdir()
        (bad / "f").write_bytes(content)
        moved.append(durable.set_aside(bad))
        assert not bad.exists()
    assert [p.name for p in moved] == ["step-1.corrupt", "step-1.corrupt2", "step-1.corrupt3"]
    assert [(p / "f").read_bytes() for p in moved] == [b"one", b"two", b"three"]


def test_set_aside_file(tmp_path: Path) -> None:
    bad = tmp_path / "fit.json"
    bad.write_bytes(b"junk")
    assert durable.set_aside(bad) == tmp_path / "fit.json.corrupt"
    assert names(tmp_path) == ["fit.json.corrupt"]


def test_remove_temps_deletes_only_temporaries(tmp_path: Path) -> None:
    (tmp_path / ".state.tmp-123.npz").write_bytes(b"x")
    (tmp_path / ".step-000000003.tmp-99").mkdir()
    (tmp_path / ".step-000000003.tmp-99" / "state.npz").write_bytes(b"x")
    (tmp_path / ".step-000000001.tmp-99-del").mkdir()
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / ".events.tmp-5.7").write_bytes(b"x")
    # Not temporaries: committed names, even ones that contain the mark, and the lock.
    (tmp_path / "notes.tmp-1.txt").write_bytes(b"keep")
    (tmp_path / "ckpt" / "state.npz").write_bytes(b"keep")
    (tmp_path / ".lock").write_bytes(b"keep")

    removed = durable.remove_temps(tmp_path)

    assert sorted(p.relative_to(tmp_path).as_posix() for p in removed) == [
        ".state.tmp-123.npz",
        ".step-000000001.tmp-99-del",
        ".step-000000003.tmp-99",
        "ckpt/.events.tmp-5.7",
    ]
    assert names(tmp_path) == [".lock", "ckpt", "ckpt/state.npz", "notes.tmp-1.txt"]


def test_remove_temps_of_missing_directory(tmp_path: Path) -> None:
    assert durable.remove_temps(tmp_path / "nope") == []


# ---------------------------------------------------------------- failpoints


def test_failpoint_is_silent_without_spec_or_for_other_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    durable.failpoint("file_after_write")
    monkeypatch.setenv("PIPELINE_FAILPOINT", "something_else:raise")
    durable.failpoint("file_after_write")


def test_failpoint_raise_on_nth_hit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "blob.bin"
    monkeypatch.setenv("PIPELINE_FAILPOINT", "file_after_fsync@2:raise")
    durable.write_bytes(target, b"first")  # hit 1 passes
    with pytest.raises(OSError) as info:  # hit 2 fails, after the temp was fsynced
        durable.write_bytes(target, b"second")
    assert info.value.errno == errno.EIO and info.value.strerror == "failpoint file_after_fsync"
    assert target.read_bytes() == b"first"
    assert names(tmp_path) == ["blob.bin"]
    durable.write_bytes(target, b"third")  # hit 3 passes again
    assert target.read_bytes() == b"third"


def test_failpoint_raise_before_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_FAILPOINT", "dir_before_manifest:raise")
    with pytest.raises(OSError, match="failpoint dir_before_manifest"):
        durable.write_dir(tmp_path / "ckpt", fill_two)
    assert names(tmp_path) == []


KILLED_WRITE = """
    from pathlib import Path
    from pipeline import durable
    root = Path({root!r})
    durable.write_bytes(root / "blob.bin", b"new content")
    durable.write_dir(root / "ckpt", lambda tmp: (tmp / "a").write_bytes(b"abc"))
    print("not killed")
"""


def test_failpoint_kill_in_file_write_leaves_old_file_and_a_temp(tmp_path: Path) -> None:
    (tmp_path / "blob.bin").write_bytes(b"old")
    result = run_python(
        KILLED_WRITE.format(root=str(tmp_path)), {"PIPELINE_FAILPOINT": "file_after_fsync"}
    )
    assert result.returncode == -9, result.stderr
    assert "not killed" not in result.stdout
    assert (tmp_path / "blob.bin").read_bytes() == b"old"
    temps = [n for n in names(tmp_path) if durable.TMP_MARK in n]
    assert len(temps) == 1 and temps[0].startswith(".blob.tmp-") and temps[0].endswith(".bin")
    assert (tmp_path / temps[0]).read_bytes() == b"new content"
    assert [p.name for p in durable.remove_temps(tmp_path)] == temps
    assert names(tmp_path) == ["blob.bin"]


def test_failpoint_kill_before_dir_rename_leaves_no_committed_dir(tmp_path: Path) -> None:
    result = run_python(
        KILLED_WRITE.format(root=str(tmp_path)), {"PIPELINE_FAILPOINT": "dir_before_rename"}
    )
    assert result.returncode == -9, result.stderr
    assert not (tmp_path / "ckpt").exists()
    temps = [n for n in os.listdir(tmp_path) if durable.TMP_MARK in n]
    assert len(temps) == 1 and temps[0].startswith(".ckpt.tmp-")
    # The killed writer got as far as the manifest: the temp verifies but is not committed.
    assert durable.verify_dir(tmp_path / temps[0]) == {}
    durable.remove_temps(tmp_path)
    assert names(tmp_path) == ["blob.bin"]


# ---------------------------------------------------------------- disk full (real EFBIG)


DISK_FULL = """
    import json, resource, signal
    from pathlib import Path
    from pipeline import durable
    target = Path({target!r})
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
    try:
        durable.write_bytes(target, b"n" * {size})
    except durable.DiskFullError as exc:
        print(json.dumps({{"type": type(exc).__name__, "message": str(exc),
                           "cause": exc.__cause__.errno}}))
    else:
        print(json.dumps({{"type": None}}))
"""


def test_disk_full_keeps_previous_file_and_names_path_and_size(tmp_path: Path) -> None:
    target = tmp_path / "state" / "weights.bin"
    target.parent.mkdir()
    target.write_bytes(b"good weights" * 1000)
    result = run_python(DISK_FULL.format(target=str(target), limit=64_000, size=2_500_000))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["type"] == "DiskFullError"
    assert report["cause"] == errno.EFBIG
    assert report["message"].startswith(f"No space left writing {target}: it needs 2.5 MB, ")
    assert "MB are free." in report["message"]
    assert target.read_bytes() == b"good weights" * 1000
    assert names(tmp_path) == ["state", "state/weights.bin"]


# ---------------------------------------------------------------- bugs


def test_disk_full_at_commit_names_the_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ENOSPC reported by fsync (delayed allocation, NFS, quotas): the writes themselves worked.
    real_fsync = os.fsync

    def fsync_enospc(fd: int) -> None:
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) == "big.bin":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_enospc)
    final = tmp_path / "ckpt"
    with pytest.raises(durable.DiskFullError) as info:
        durable.write_dir(final, lambda tmp: (tmp / "big.bin").write_bytes(b"x" * 2_000_000))
    assert names(tmp_path) == []
    assert str(info.value).startswith(f"No space left writing {final}: it needs 2.0 MB, ")


MANIFEST_FULL = """
    import resource, signal
    from pathlib import Path
    from pipeline import durable
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
    def fill(tmp):
        for i in range(30):          # 30 small files: each fits, their manifest does not
            (tmp / f"f{{i}}").write_bytes(b"x" * 10)
    try:
        durable.write_dir(Path({final!r}), fill)
    except durable.DiskFullError as exc:
        print(exc)
"""


def test_disk_full_writing_manifest_names_the_directory(tmp_path: Path) -> None:
    final = tmp_path / "ckpt"
    result = run_python(MANIFEST_FULL.format(final=str(final)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("No space left writing ")
    assert names(tmp_path) == []
    assert result.stdout.startswith(f"No space left writing {final}: it needs ")
    assert "it needs 0.0 MB" not in result.stdout
