"""Durable, atomic writes: the one place that decides how state survives a crash.

A file is written to a temporary name in its final directory, flushed, fsynced, renamed into
place, and the directory is fsynced. A directory of files (a checkpoint, an export) is written
into a temporary directory, every file is fsynced, a MANIFEST.json with sizes and sha256 is
written last, and the directory is committed by one rename. Readers only ever see committed
names, and verify the manifest before trusting what they read.

Fault injection: PIPELINE_FAILPOINT=<name>[@<hit>][:<action>] stops the process at a named step
(action `kill`: SIGKILL itself, the default; `raise`: an OSError). Used by the crash tests.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)
TMP_MARK = ".tmp-"
MANIFEST = "MANIFEST.json"
_failpoint_hits: dict[str, int] = {}


class CorruptArtifact(Exception):
    """A committed file or directory failed verification: truncated, flipped or incomplete."""


class DiskFullError(PipelineError):
    pass


class DiskError(PipelineError):
    """The disk or filesystem failed a call (an I/O error and the like)."""


def failpoint(name: str) -> None:
    """Stop here if PIPELINE_FAILPOINT names this point (see module docstring)."""
    spec = os.environ.get("PIPELINE_FAILPOINT")
    if not spec:
        return
    target, _, action = spec.partition(":")
    target, _, hit = target.partition("@")
    if target != name:
        return
    _failpoint_hits[name] = _failpoint_hits.get(name, 0) + 1
    if _failpoint_hits[name] != int(hit or 1):
        return
    if action == "raise":
        raise OSError(errno.EIO, f"failpoint {name}")
    os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with naming(path):
            os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """`mkdir -p` whose new directories survive a power cut: the parent of each directory it
    creates is fsynced (a plain mkdir is lost with everything committed inside it)."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for new in reversed(missing):
        try:
            new.mkdir()
        except FileExistsError:
            pass  # made by someone else meanwhile (or a file: the next step names it)
        fsync_dir(new.parent)


def sync_ancestors(path: Path) -> None:
    """fsync `path` and every directory above it on the same filesystem. A directory created
    with a plain mkdir (by Hydra, a user or an earlier session cut short) is then durable
    before anything is committed inside it."""
    path = path.absolute()
    device = path.stat().st_dev
    while True:
        try:
            fsync_dir(path)
        except PermissionError:
            return  # an ancestor we may not open (drwx--x--x): not ours to make durable
        parent = path.parent
        if parent == path or parent.stat().st_dev != device:
            return
        path = parent


def temp_name(final: Path) -> Path:
    """A temporary sibling of `final` that keeps its suffix (Keras checks file suffixes)."""
    return final.with_name(f".{final.stem}{TMP_MARK}{os.getpid()}{final.suffix}")


def _space_message(path: Path, needed: int | None) -> str:
    try:
        free = _size(shutil.disk_usage(path if path.is_dir() else path.parent).free)
    except OSError:
        free = "no more"
    need = _size(needed) if needed else "more space"
    return (
        f"No space left writing {path}: it needs {need}, {free} are free. "
        "Free some disk space (or raise the file-size limit) and run the same command again; "
        "nothing committed was lost."
    )


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def _dir_size(directory: Path) -> int:
    try:
        return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    except OSError:  # the disk that failed the write may fail this too
        return 0


def _translate(exc: OSError, path: Path, needed: int | None) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return DiskFullError(_space_message(path, needed))
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PipelineError(
            f"Cannot write {path}: {exc.strerror}. Make the directory "
            "writable or choose another one with run.outputs=..."
        )
    if exc.filename is None:  # e.g. from a write() on an open file: say which file
        return OSError(exc.errno, exc.strerror, str(path))
    return exc


def disk_error(exc: OSError, path: Path | str | None = None) -> PipelineError:
    """A failed call of the disk or filesystem as one clear message naming the path: for
    errors outside durable's own writes (Hydra's files, the log, TensorFlow's writers)."""
    where = Path(path or exc.filename or "the run directory")
    translated = _translate(exc, where, None)
    if isinstance(translated, PipelineError):  # a full disk, or one that is not writable
        return translated
    name = errno.errorcode.get(exc.errno or 0, "error")
    return DiskError(
        f"I/O error on {where}: {exc.strerror or exc} ({name}). The disk or filesystem "
        "failed; check it (e.g. dmesg), then run the same command again: nothing committed "
        "was lost."
    )


# errno values whose text (os.strerror) in a library's error message means the disk failed.
_DISK_ERRNOS = (
    errno.EIO,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EFBIG,
    errno.EROFS,
    errno.EACCES,
    errno.ENXIO,
    errno.ENOTCONN,
)
_ERRNO_NUMBER = re.compile(r"errno = (\d+)")
_ABSOLUTE_PATH = re.compile(r"(?<![\w/.-])(/[^\s;'\"]+)")


def is_disk_failure(exc: OSError) -> bool:
    """An I/O error or a full disk: not a missing or unreadable file, but a failing device."""
    return exc.errno in _DISK_ERRNOS and exc.errno not in (errno.EACCES, errno.EPERM)


def os_error_in(exc: BaseException, near: Path | None = None) -> OSError | None:
    """The OS error behind a library's exception (TensorFlow's C++ file layer, h5py, ...),
    found in its message or those it chains to, as an OSError naming the file; else None."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, OSError) and seen.errno in _DISK_ERRNOS:
            return seen
        text = str(seen)
        number = _ERRNO_NUMBER.search(text)
        codes = [int(number.group(1))] if number else []
        codes += [c for c in _DISK_ERRNOS if os.strerror(c) in text]
        codes = [c for c in codes if c in _DISK_ERRNOS]
        if codes:
            # Paths the message names (not TensorFlow's device names like /job:localhost/...).
            paths = [p.rstrip(".,:)]}") for p in _ABSOLUTE_PATH.findall(text)]
            paths = [p for p in paths if Path(p).parent.is_dir()]
            if near is not None:
                paths = [p for p in paths if p.startswith(str(near))] or paths
            where = paths[0] if paths else (str(near) if near else None)
            return OSError(codes[0], os.strerror(codes[0]), where)
        seen = seen.__cause__ or seen.__context__
    return None


def _unreadable(directory: Path) -> OSError | None:
    """Read back every file under `directory`: the OS error the disk gives, if any."""
    path = directory
    try:
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                with open(path, "rb") as handle:
                    while handle.read(1 << 20):
                        pass
    except OSError as exc:
        if exc.filename is None:
            return OSError(exc.errno, exc.strerror, str(path))
        return exc
    return None


def write_file(final: Path, write: Callable[[Path], object], size_hint: int | None = None) -> None:
    """Commit a file written by `write(temp_path)` to `final` atomically and durably."""
    tmp = temp_name(final)
    try:
        make_dirs(final.parent)
        failpoint("file_before_write")
        write(tmp)
        failpoint("file_after_write")
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        failpoint("file_after_fsync")
        os.replace(tmp, final)
        failpoint("file_after_rename")
        fsync_dir(final.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):  # a failing disk may refuse this too: the error
            tmp.unlink(missing_ok=True)  # to report is the first; the next run cleans up
        raise _translate(exc, final, size_hint) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def write_bytes(final: Path, data: bytes) -> None:
    write_file(final, lambda tmp: tmp.write_bytes(data), size_hint=len(data))


def _record_bytes(payload: Any) -> bytes:
    body = json.dumps(payload, sort_keys=True, indent=1)
    digest = hashlib.sha256(body.encode()).hexdigest()
    return json.dumps(
        {"sha256": digest, "data": json.loads(body)}, sort_keys=True, indent=1
    ).encode()


def write_record(final: Path, payload: Any) -> None:
    """A small JSON record with its own checksum, so a flipped byte is detected on read."""
    write_bytes(final, _record_bytes(payload))


def read_record(path: Path) -> Any:
    """Read a record written by write_record; raise CorruptArtifact if it does not verify."""
    with naming(path):
        raw = path.read_bytes()
    try:
        outer = json.loads(raw)
        body = json.dumps(outer["data"], sort_keys=True, indent=1)
        ok = hashlib.sha256(body.encode()).hexdigest() == outer["sha256"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptArtifact(f"{path}: unreadable record ({exc})") from exc
    if not ok:
        raise CorruptArtifact(f"{path}: checksum mismatch")
    return outer["data"]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with naming(path), open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def naming(path: Path | str) -> Iterator[None]:
    """An OSError of a call on an open file (read, write, close) names no file: name `path`."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def temp_dir(final: Path) -> Path:
    """A fresh temporary directory beside `final`, to be committed with commit_dir."""
    make_dirs(final.parent)
    tmp = final.with_name(f".{final.name}{TMP_MARK}{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit_dir(tmp: Path, final: Path, meta: dict[str, Any] | None = None) -> None:
    """fsync every file in `tmp`, write its manifest last, and rename it to `final`."""
    try:
        files = {}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            with open(path, "rb+") as handle:
                os.fsync(handle.fileno())
            files[str(path.relative_to(tmp))] = {
                "size": path.stat().st_size,
                "sha256": sha256_file(path),
            }
        for sub in sorted((p for p in tmp.rglob("*") if p.is_dir()), reverse=True):
            fsync_dir(sub)
        failpoint("dir_before_manifest")
        # Written in place: the directory is not visible under its final name yet.
        with open(tmp / MANIFEST, "wb") as handle:
            handle.write(_record_bytes({"files": files, "meta": meta or {}}))
            handle.flush()
            os.fsync(handle.fileno())
        fsync_dir(tmp)
        failpoint("dir_before_rename")
        os.replace(tmp, final)
        failpoint("dir_after_rename")
        fsync_dir(final.parent)
    except OSError as exc:
        size = _dir_size(tmp) if tmp.exists() else None
        shutil.rmtree(tmp, ignore_errors=True)
        raise _translate(exc, final, size) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_dir(
    final: Path,
    fill: Callable[[Path], None],
    meta: dict[str, Any] | None = None,
    size_hint: int | None = None,
) -> None:
    """Create `final` atomically: `fill(tmp)` writes the files, then commit_dir publishes them.
    `size_hint` (bytes the files will take) makes a disk-full message exact."""
    try:
        tmp = temp_dir(final)
    except OSError as exc:
        raise _translate(exc, final, size_hint) from exc
    try:
        fill(tmp)
    except OSError as exc:
        size = size_hint or _dir_size(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        raise _translate(exc, final, size or None) from exc
    except PipelineError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as exc:
        # Libraries that write and re-read files (TensorFlow, Keras, h5py, the TFLite
        # converter) often report a failing disk as their own error: its text names the
        # errno, or the error is masked ("file not found"). If the disk is the cause, say so.
        cause = os_error_in(exc, tmp) or _unreadable(tmp)
        size = size_hint or _dir_size(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if cause is None:
            raise
        raise _translate(cause, final, size or None) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_dir(tmp, final, meta)
    # The crash harness (scripts/crash_test.py --power-cut) reads this line in pipeline.log:
    # a directory named here must survive any later power cut.
    log.debug("Committed %s (pid %d)", final, os.getpid())


def verify_dir(path: Path) -> dict[str, Any]:
    """Check a committed directory against its manifest; return the manifest's meta."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise CorruptArtifact(f"{path}: no {MANIFEST} (incomplete write)")
    record = read_record(manifest)
    for name, expected in record["files"].items():
        file = path / name
        if not file.is_file():
            raise CorruptArtifact(f"{file}: missing")
        if file.stat().st_size != expected["size"]:
            raise CorruptArtifact(
                f"{file}: size {file.stat().st_size}, expected {expected['size']} (truncated?)"
            )
        if sha256_file(file) != expected["sha256"]:
            raise CorruptArtifact(f"{file}: sha256 mismatch (corrupted)")
    return record["meta"]


def set_aside(path: Path) -> Path:
    """Move a corrupt artifact out of the way (never delete evidence) and return where."""
    target = path.with_name(f"{path.name}.corrupt")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt{n}")
    os.replace(path, target)
    fsync_dir(path.parent)
    return target


def remove_temps_of(final: Path) -> list[Path]:
    """Delete the temporaries of `final` left by killed writers (the caller knows none is
    alive: it holds the lock that writers of `final` hold)."""
    removed = sorted(final.parent.glob(f".{final.name}{TMP_MARK}*"))
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed


def remove_temps(directory: Path) -> list[Path]:
    """Delete temporary files and directories left by killed writes under `directory`."""
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for path in sorted(directory.rglob(f"*{TMP_MARK}*"), reverse=True):
        if not path.exists() or not path.name.startswith("."):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed
