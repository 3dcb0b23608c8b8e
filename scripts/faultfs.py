#!/usr/bin/env python3
"""faultfs: a FUSE pass-through filesystem that can lose power and fail like a bad disk.

    python scripts/faultfs.py BACKING MOUNT [--state DIR] [--ctl NAME] [--model strict|sync]
    python scripts/faultfs.py ctl NAME '{"cmd": "stats"}'

Modelled on Jepsen's LazyFS (un-fsynced data is lost at a crash) and ScyllaDB's CharybdeFS
(syscalls fail on demand). Everything under MOUNT is a plain pass-through onto BACKING, the
"live" tree, so programs run at close to native speed. Next to it the filesystem keeps a
"durable image" of what a disk would still hold after a power cut, and `cut` replaces the
live tree by that image. Needs: `apt-get install fuse3` (fusermount3, libfuse3) and
`pip install mfusepy` (ctypes binding for libfuse 3). It does not import the `pipeline` package.

Durability model (strict)
-------------------------
Every file, directory and symlink is an object identified by its inode (not by its name), so
renames and hard links move or share objects instead of copying them.

* File data: the durable content of a file is exactly its content at its last successful
  fsync/fdatasync (on any descriptor of that inode), or empty if it was never fsynced. Every
  write, truncate, ftruncate, O_TRUNC and fallocate since then is volatile. chmod is recorded
  with the next fsync of the file. A plain close() persists nothing.
* Namespace: the durable content of a directory is exactly its list of (name -> object) at its
  last fsync on a directory descriptor (`os.fsync(os.open(dir, os.O_RDONLY))`). So each create,
  mkdir, symlink, link, unlink, rmdir and rename is pending until its parent directory is
  fsynced; a rename between two directories needs both parents fsynced (with only the new
  parent fsynced the object comes back under both names; with only the old one, under none).
  fsync of a file does NOT make its own directory entry durable.
* What survives a cut is what is reachable from the root through durable directory listings:
  a file fsynced inside a new directory that was never made durable in its parent is lost.
* Timestamps and ownership are not modelled (a restored file gets fresh times).

Why this is at least as harsh as ext4 with data=ordered: ext4 only promises that data and
inode of a file are on disk once fsync(file) returns and that directory entries are on disk
once fsync(dir) returns; anything else may or may not have reached the disk at a crash
(writeback and the 5 s journal commit may come at any time, or not at all). A default cut
takes the worst case for every single item: nothing that was not explicitly fsynced survives.
It also does not grant ext4's extra, implicit guarantees: fsync of a new file commits its
directory entry with the journal transaction, renames and other metadata operations reach
disk in order, replace-via-rename of a truncated file forces its data out (auto_da_alloc).
Every guarantee this model gives, ext4 gives too, so a program that is crash-safe here only
relies on what POSIX and ext4 promise. Not explored (ext4 can produce them, a cut cannot):
torn writes inside a file (part of its un-fsynced pages reached the disk) and a directory
of which only some pending entries reached the disk; a program that trusts un-fsynced bytes
without a checksum can still be fooled by those on a real disk.

`cut(seed=...)` explores reorderings instead of dropping everything: each file with volatile
data independently keeps either its durable content or its whole current content (as if the
kernel had written it back before the crash), and each directory with pending changes keeps
either its durable listing or its whole current listing (as if it had been flushed). Every
such combination is a legal crash state of the model above. `--model sync` (FaultFS(...,
model="sync")) is a perfect disk: a cut loses nothing. It is a baseline for a harness, and
the unit tests run their scenarios on it to show that they catch a model that drops nothing.

Faults (CharybdeFS-style): `fault(op, glob, "EIO"|"ENOSPC"|..., nth, every)` makes the nth
matching call (or every call from the nth on) fail with that errno before it does anything:
a failed fsync persists nothing and the data stays volatile (a later fsync can persist it).
`noflock` makes flock() fail (ENOLCK by default, like NFS without a lock manager); fcntl/lockf
locks are handled by the kernel locally and cannot be refused.

Control: the daemon listens on an abstract unix socket (one JSON request per connection, one
JSON line back), and `FaultFS` wraps it: start, cut (+ remount), fault, no_flock, stats, sync,
kill_users, unmount. A cut puts the daemon in "power off" mode (every call fails with EIO),
records the durable image in the state directory and the next daemon rebuilds the live tree
from it before mounting: a remount, so no kernel cache of the old tree survives.

Notes for harnesses
-------------------
* Kill before a cut: start the program with `start_new_session=True`, `os.killpg(pid,
  SIGKILL)` and wait() for it, then `cut()`. `kill_users()` SIGKILLs processes that hold an
  open file, cwd or mapping in the mount at that instant (it misses one that is between two
  opens); a process still alive at the cut gets EIO, then ENOTCONN (the mount is detached
  lazily and the daemon stopped).
* Fault op names: getattr readlink opendir readdir releasedir fsyncdir open (existing file)
  create (O_CREAT of a new file) read write flush release fsync (fsync and fdatasync of a
  file; fsyncdir for a directory) mkdir rmdir unlink rename (matches either name) link
  symlink truncate chmod chown utimens statfs flock fallocate; "a,b" or "*" for several.
  They count FUSE requests: one write() of up to 1 MiB is one "write" (bigger ones are
  split), and Python's buffered files write when their buffer fills or on flush.
* Works: mmap (the kernel page cache is used, not direct_io: MAP_SHARED writes reach the FS
  on msync/munmap/writeback and an fsync persists them), os.replace across directories (its
  durability needs both directories fsynced), hard links, symlinks, fsync of a file that is
  unlinked while open, O_APPEND, fallocate, flock (real, per open file), inode numbers of
  the backing files (use_ino). O_DIRECT is ignored. No xattrs, no mknod (fifos).
* A clean unmount counts as a sync: the next mount takes the live tree as fully durable.
  The durable image is written to STATE/state.json at mount, at a cut and at a clean
  unmount; if the daemon itself is SIGKILLed the next mount also starts from the live tree.
  While mounted, change BACKING only through the mount.
* Cost: writes and reads go through Python (about 0.3 s more per 50 MB in 1 MiB writes);
  fsync copies the ranges written since the last fsync (the whole file the first time) into
  STATE/objects; a cut remount takes about 0.2 s and moves clean files instead of copying.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import fnmatch
import json
import os
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"
OBJECTS_DIR = "objects"
HOLD_NAME = ".faultfs-restore-hold"
LOG_KEEP = 5000
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
OPS = (
    "getattr",
    "readlink",
    "opendir",
    "readdir",
    "releasedir",
    "fsyncdir",
    "open",
    "create",
    "read",
    "write",
    "flush",
    "release",
    "fsync",
    "mkdir",
    "rmdir",
    "unlink",
    "rename",
    "link",
    "symlink",
    "truncate",
    "chmod",
    "chown",
    "utimens",
    "statfs",
    "flock",
    "fallocate",
)
INSTALL_HINT = "install them with: apt-get install -y fuse3 && pip install mfusepy"


def _errno_of(name: str | int) -> int:
    if isinstance(name, int):
        return name
    value = getattr(errno, name.upper(), None)
    if not isinstance(value, int):
        raise ValueError(f"unknown errno name {name!r} (use e.g. EIO, ENOSPC, ENOLCK)")
    return value


def _fuse_error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _copy_range(src: int, dst: int, offset: int, length: int) -> int:
    """Copy bytes [offset, offset+length) of src to the same offsets of dst; bytes copied."""
    done = 0
    while done < length:
        pos = offset + done
        try:
            n = os.copy_file_range(src, dst, length - done, pos, pos)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            chunk = os.pread(src, min(1 << 20, length - done), pos)
            n = os.pwrite(dst, chunk, pos) if chunk else 0
        if n == 0:
            break
        done += n
    return done


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


@dataclass
class Obj:
    """One inode of the model. `entries` (dirs) and `snap` (files) are the durable state."""

    kind: str  # "file" | "dir" | "symlink" | "other"
    mode: int
    target: str = ""  # symlink target
    snap: bool = False  # objects/<oid> holds the durable content (else it is empty)
    entries: dict[str, int] = field(default_factory=dict)  # dirs: durable name -> oid
    dirty: list[tuple[int, int]] = field(default_factory=list)  # volatile written ranges
    trunc: int | None = None  # lowest size truncated to since the last snapshot

    @property
    def is_dirty(self) -> bool:
        return bool(self.dirty) or self.trunc is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "mode": self.mode,
            "target": self.target,
            "snap": self.snap,
            "entries": self.entries,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Obj:
        return cls(
            kind=data["kind"],
            mode=data["mode"],
            target=data.get("target", ""),
            snap=data.get("snap", False),
            entries={k: int(v) for k, v in data.get("entries", {}).items()},
        )


def _kind_of(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


@dataclass
class Fault:
    op: str  # op name, comma-separated names, or "*"
    pattern: str  # fnmatch glob on the path inside the mount ("/a/b"), or "re:<regex>"
    code: int
    nth: int = 1
    every: bool = False
    seen: int = 0
    injected: int = 0

    def applies(self, op: str, paths: tuple[str, ...]) -> bool:
        if self.op != "*" and op not in self.op.split(","):
            return False
        if self.pattern.startswith("re:"):
            return any(re.search(self.pattern[3:], p) for p in paths)
        return any(fnmatch.fnmatchcase(p, self.pattern) for p in paths)

    def to_json(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "path": self.pattern,
            "errno": errno.errorcode.get(self.code, str(self.code)),
            "nth": self.nth,
            "every": self.every,
            "seen": self.seen,
            "injected": self.injected,
        }


@dataclass
class Handle:
    oid: int
    path: str


class FaultOps:
    """The filesystem: pass-through onto `backing`, durable image in `state_dir`.

    Built on mfusepy's Operations API (methods take paths relative to the mount, "/x/y", and
    file handles, which here are the daemon's own descriptors on the backing files).
    """

    use_ns = True
    # With nullpath_ok libfuse passes no path to calls that have a handle; every handle call
    # then works on the descriptor, which also covers files unlinked while open.
    flag_nopath = True
    flag_nullpath_ok = True

    def __init__(self, backing: Path, state_dir: Path, model: str = "strict") -> None:
        if model not in ("strict", "sync"):
            raise ValueError("model must be 'strict' or 'sync'")
        self.root = str(backing.resolve())
        self.state_dir = state_dir.resolve()
        self.objdir = self.state_dir / OBJECTS_DIR
        self.model = model
        self.mutex = threading.RLock()
        self.objs: dict[int, Obj] = {}
        self.ino2oid: dict[int, int] = {}
        self.next_oid = 1
        self.handles: dict[int, Handle] = {}
        self.faults: list[Fault] = []
        self.noflock: int | None = None
        self.dead = False
        self.mounted = False
        self.ops: Counter[str] = Counter()
        self.totals: Counter[str] = Counter()
        self.log: deque[dict[str, Any]] = deque(maxlen=LOG_KEEP)
        self.cuts: list[dict[str, Any]] = []

    # ----- state on disk ---------------------------------------------------------------------

    def _event(self, kind: str, **info: Any) -> None:
        self.log.append({"t": round(time.time(), 6), "ev": kind, **info})

    def save_state(self, restore_needed: bool, reuse: dict[int, str] | None = None) -> None:
        data = {
            "version": 1,
            "restore_needed": restore_needed,
            "model": self.model,
            "next_oid": self.next_oid,
            "objects": {str(k): v.to_json() for k, v in self.objs.items()},
            "reuse": {str(k): v for k, v in (reuse or {}).items()},
            "faults": [f.to_json() for f in self.faults],
            "noflock": self.noflock,
            "totals": dict(self.totals + self.ops),
            "log": list(self.log),
            "cuts": self.cuts,
        }
        tmp = self.state_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.state_dir / STATE_FILE)

    def prepare(self) -> None:
        """Before mounting: rebuild the live tree after a cut, or take it as fully durable."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.state_dir / STATE_FILE
        data = json.loads(path.read_text()) if path.exists() else None
        if data is not None:
            self.faults = [
                Fault(
                    f["op"],
                    f["path"],
                    _errno_of(f["errno"]),
                    f["nth"],
                    f["every"],
                    f["seen"],
                    f["injected"],
                )
                for f in data.get("faults", [])
            ]
            self.noflock = data.get("noflock")
            self.totals = Counter(data.get("totals", {}))
            self.log.extend(data.get("log", []))
            self.cuts = data.get("cuts", [])
        if data is not None and data.get("restore_needed"):
            self.objs = {int(k): Obj.from_json(v) for k, v in data["objects"].items()}
            self.next_oid = data["next_oid"]
            self._restore({int(k): v for k, v in data.get("reuse", {}).items()})
        else:
            self._fresh()
        self.save_state(restore_needed=False)

    def _fresh(self) -> None:
        """Everything in the backing tree now is durable (as after a clean unmount)."""
        shutil.rmtree(self.objdir, ignore_errors=True)
        self.objdir.mkdir(parents=True)
        self.objs, self.ino2oid, self.next_oid = {}, {}, 1
        st = os.lstat(self.root)
        self.objs[0] = Obj("dir", stat.S_IMODE(st.st_mode))
        self.ino2oid[st.st_ino] = 0
        stack = [self.root]
        while stack:
            top = stack.pop()
            listing: dict[str, int] = {}
            with os.scandir(top) as it:
                for entry in it:
                    est = entry.stat(follow_symlinks=False)
                    oid = self._oid_of(est, entry.path)
                    obj = self.objs[oid]
                    listing[entry.name] = oid
                    if obj.kind == "dir":
                        stack.append(entry.path)
                    elif obj.kind == "file" and not obj.snap and est.st_size:
                        shutil.copyfile(entry.path, self.objdir / str(oid))
                        obj.snap = True
            self.objs[self.ino2oid[os.lstat(top).st_ino]].entries = listing

    def _restore(self, reuse: dict[int, str]) -> None:
        """Replace the live tree by the durable image (clean files are moved, not copied)."""
        root = Path(self.root)
        hold = root / HOLD_NAME
        if hold.exists():
            shutil.rmtree(hold)
        hold.mkdir()
        for oid, rel in reuse.items():
            with contextlib.suppress(OSError):
                os.rename(root / rel, hold / str(oid))
        for entry in os.scandir(root):
            if entry.name == HOLD_NAME:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        self.ino2oid = {os.lstat(root).st_ino: 0}
        placed: dict[int, Path] = {}
        dirs_done = {0}
        queue: deque[tuple[int, Path]] = deque([(0, root)])
        while queue:
            doid, dpath = queue.popleft()
            for name, oid in sorted(self.objs[doid].entries.items()):
                obj = self.objs.get(oid)
                target = dpath / name
                if obj is None or obj.kind == "other":
                    continue
                if obj.kind == "dir":
                    if oid in dirs_done:  # reachable twice (half-durable cross-dir rename)
                        self._event("restore-skip-duplicate-dir", path="/" + str(target))
                        continue
                    dirs_done.add(oid)
                    os.mkdir(target)
                    os.chmod(target, obj.mode)
                    queue.append((oid, target))
                elif obj.kind == "symlink":
                    os.symlink(obj.target, target)
                elif oid in placed:
                    os.link(placed[oid], target)
                else:
                    held = hold / str(oid)
                    if held.exists():
                        os.rename(held, target)
                    elif obj.snap:
                        shutil.copyfile(self.objdir / str(oid), target)
                    else:
                        target.touch()
                    os.chmod(target, obj.mode)
                    placed[oid] = target
                self.ino2oid[os.lstat(target).st_ino] = oid
        os.chmod(root, self.objs[0].mode)
        shutil.rmtree(hold)
        linked = set(self.ino2oid.values())
        alive = dirs_done | set(placed) | {o for o in linked if self.objs[o].kind == "symlink"}
        for oid in list(self.objs):
            if oid not in alive:
                del self.objs[oid]
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.objdir / str(oid))

    # ----- helpers ---------------------------------------------------------------------------

    def _full(self, path: str) -> str:
        return self.root + path if path != "/" else self.root

    def _oid_of(self, st: os.stat_result, full: str | None = None) -> int:
        """The object of a live inode, created on first sight (new files start empty)."""
        oid = self.ino2oid.get(st.st_ino)
        if oid is not None:
            return oid
        oid = self.next_oid
        self.next_oid += 1
        kind = _kind_of(st.st_mode)
        obj = Obj(kind, stat.S_IMODE(st.st_mode))
        if kind == "symlink" and full is not None:
            obj.target = os.readlink(full)
        self.objs[oid] = obj
        self.ino2oid[st.st_ino] = oid
        return oid

    def _forget(self, st: os.stat_result | None) -> None:
        """An inode lost its last name: its number may be reused by a new, unrelated file."""
        if st is not None and (stat.S_ISDIR(st.st_mode) or st.st_nlink <= 1):
            self.ino2oid.pop(st.st_ino, None)

    def _enter(self, op: str, *paths: str | None) -> None:
        """Count the call; fail it if the power is off or a fault rule says so."""
        with self.mutex:
            self.ops[op] += 1
            if self.dead:
                raise _fuse_error(errno.EIO)
            names = tuple(p for p in paths if p)
            for rule in self.faults:
                if rule.applies(op, names):
                    rule.seen += 1
                    if rule.seen == rule.nth or (rule.every and rule.seen > rule.nth):
                        rule.injected += 1
                        self.ops["faults_injected"] += 1
                        self._event("fault", op=op, path=names[0] if names else "", errno=rule.code)
                        raise _fuse_error(rule.code)

    @contextlib.contextmanager
    def _op(self, op: str, *paths: str | None) -> Iterator[None]:
        """`_enter`, then run the body under the lock: a change to the live tree can neither
        interleave with an fsync snapshot nor slip in after a cut switched the power off."""
        with self.mutex:
            self._enter(op, *paths)
            yield

    def _hpath(self, path: str | None, fh: int | None) -> str | None:
        if path:
            return path
        handle = self.handles.get(fh) if fh is not None else None
        return handle.path if handle else None

    def _mark(self, oid: int, start: int, end: int) -> None:
        obj = self.objs.get(oid)
        if obj is None or end <= start:
            return
        obj.dirty.append((start, end))
        if len(obj.dirty) > 4096:
            obj.dirty = _merge(obj.dirty)

    def _mark_trunc(self, oid: int, size: int) -> None:
        obj = self.objs.get(oid)
        if obj is not None:
            obj.trunc = size if obj.trunc is None else min(obj.trunc, size)

    def _persist_data(self, oid: int, src: int) -> int:
        """Make the live content of readable descriptor `src` the durable content of `oid`."""
        obj = self.objs[oid]
        st = os.fstat(src)
        size = st.st_size
        dst_path = self.objdir / str(oid)
        copied = 0
        if not obj.snap or not dst_path.exists():
            dst = os.open(dst_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                copied = _copy_range(src, dst, 0, size)
            finally:
                os.close(dst)
        elif obj.is_dirty:
            dst = os.open(dst_path, os.O_WRONLY)
            try:
                if obj.trunc is not None:
                    os.ftruncate(dst, min(obj.trunc, size))
                os.ftruncate(dst, size)
                for start, end in _merge(obj.dirty):
                    end = min(end, size)
                    if start < end:
                        copied += _copy_range(src, dst, start, end - start)
            finally:
                os.close(dst)
        obj.snap, obj.dirty, obj.trunc = True, [], None
        obj.mode = stat.S_IMODE(st.st_mode)
        self.ops["bytes_persisted"] += copied
        return copied

    def _persist_path(self, oid: int, full: str) -> int:
        fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            return self._persist_data(oid, fd)
        finally:
            os.close(fd)

    def _live_listing(self, dir_fd: int) -> dict[str, int]:
        listing = {}
        for name in os.listdir(dir_fd):
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            full = f"/proc/self/fd/{dir_fd}/{name}"
            listing[name] = self._oid_of(st, full)
        return listing

    def _walk_live(self) -> tuple[dict[int, dict[str, int]], dict[int, list[str]]]:
        """Current listing of every live directory and the live paths of every object."""
        listings: dict[int, dict[str, int]] = {}
        paths: dict[int, list[str]] = {0: ["/"]}
        stack = [("/", 0)]
        while stack:
            rel, doid = stack.pop()
            fd = os.open(self._full(rel), os.O_RDONLY | os.O_DIRECTORY)
            try:
                listing = self._live_listing(fd)
            finally:
                os.close(fd)
            listings[doid] = listing
            for name, oid in listing.items():
                child = rel.rstrip("/") + "/" + name
                first = oid not in paths
                paths.setdefault(oid, []).append(child)
                if first and self.objs[oid].kind == "dir":
                    stack.append((child, oid))
        return listings, paths

    # ----- control ---------------------------------------------------------------------------

    def control(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        with self.mutex:
            if cmd == "ping":
                return {"ok": True, "mounted": self.mounted, "pid": os.getpid(), "dead": self.dead}
            if cmd == "fault":
                rule = Fault(
                    str(req.get("op", "*")),
                    str(req.get("path", "*")),
                    _errno_of(req.get("errno", "EIO")),
                    int(req.get("nth", 1)),
                    bool(req.get("every", False)),
                )
                if rule.nth < 1:
                    raise ValueError("nth counts from 1")
                self.faults.append(rule)
                self._event("fault-armed", **rule.to_json())
                return {"ok": True, "id": len(self.faults) - 1}
            if cmd == "clear_faults":
                self.faults = []
                return {"ok": True}
            if cmd == "noflock":
                self.noflock = _errno_of(req.get("errno", "ENOLCK")) if req.get("on") else None
                return {"ok": True}
            if cmd == "stats":
                return {"ok": True, **self.stats()}
            if cmd == "sync":
                return {"ok": True, **self._settle(keep=1.0, rng=random.Random(0), cut=False)}
            if cmd == "cut":
                seed = req.get("seed")
                keep = float(req.get("keep", 0.5))
                if self.model == "sync":
                    keep, seed = 1.0, 0
                if seed is None:
                    keep = 0.0
                summary = self._settle(keep=keep, rng=random.Random(seed), cut=True)
                summary["seed"] = req.get("seed")
                return {"ok": True, **summary}
        raise ValueError(f"unknown command {cmd!r}")

    def stats(self) -> dict[str, Any]:
        return {
            "ops": {k: v for k, v in self.ops.items() if k in OPS},
            "faults_injected": self.ops["faults_injected"],
            "bytes_persisted": self.ops["bytes_persisted"],
            "totals": dict(self.totals + self.ops),
            "faults": [f.to_json() for f in self.faults],
            "noflock": errno.errorcode.get(self.noflock, None) if self.noflock else None,
            "cuts": self.cuts,
            "log": list(self.log),
            "model": self.model,
        }

    def _settle(self, keep: float, rng: random.Random, cut: bool) -> dict[str, Any]:
        """Decide every pending item: keep it (persist now) or drop it; then, for a cut,
        switch the power off and write the durable image for the next daemon."""
        if cut:
            self.dead = True
        listings, paths = self._walk_live()
        kept_data, dropped_data, kept_dirs, dropped_dirs = [], [], [], []
        for oid in sorted(o for o, obj in self.objs.items() if obj.is_dirty):
            where = sorted(paths.get(oid, []))
            if where and rng.random() < keep:
                self._persist_path(oid, self._full(where[0]))
                kept_data.append(where[0])
            elif where:
                dropped_data.append(where[0])
        for doid in sorted(listings, key=lambda o: sorted(paths[o])[0]):
            live, durable = listings[doid], self.objs[doid].entries
            if live == durable:
                continue
            change = {
                "path": sorted(paths[doid])[0],
                "added": sorted(n for n in live if durable.get(n) != live[n]),
                "removed": sorted(n for n in durable if n not in live),
            }
            if rng.random() < keep:
                self.objs[doid].entries = dict(live)
                kept_dirs.append(change)
            else:
                dropped_dirs.append(change)
        summary: dict[str, Any] = {
            "kept_data": kept_data,
            "dropped_data": dropped_data,
            "kept_dirs": kept_dirs,
            "dropped_dirs": dropped_dirs,
        }
        self._event("cut" if cut else "sync", **{k: len(v) for k, v in summary.items()})
        if cut:
            reuse: dict[int, str] = {}
            for oid, where in paths.items():
                obj = self.objs[oid]
                if obj.kind == "file" and not obj.is_dirty:
                    if obj.snap or os.lstat(self._full(where[0])).st_size == 0:
                        reuse[oid] = where[0].lstrip("/")
            self.cuts.append({k: len(v) for k, v in summary.items()})
            self.save_state(restore_needed=True, reuse=reuse)
        return summary

    # ----- FUSE operations -------------------------------------------------------------------
    # Calls that change the live tree run entirely under the lock (`_op`); reads only count.

    def init_with_config(self, conn: Any, config: Any) -> None:
        self.mounted = True

    def destroy(self, path: str) -> None:
        self.mounted = False

    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, Any]:
        self._enter("getattr", self._hpath(path, fh))
        st = os.fstat(fh) if fh is not None else os.lstat(self._full(path or "/"))
        return {
            "st_mode": st.st_mode,
            "st_ino": st.st_ino,
            "st_nlink": st.st_nlink,
            "st_uid": st.st_uid,
            "st_gid": st.st_gid,
            "st_size": st.st_size,
            "st_rdev": st.st_rdev,
            "st_blocks": st.st_blocks,
            "st_blksize": st.st_blksize,
            "st_atime": st.st_atime_ns,
            "st_mtime": st.st_mtime_ns,
            "st_ctime": st.st_ctime_ns,
        }

    def readlink(self, path: str) -> str:
        self._enter("readlink", path)
        return os.readlink(self._full(path))

    def statfs(self, path: str) -> dict[str, int]:
        self._enter("statfs", path)
        sv = os.statvfs(self.root)
        keys = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree")
        return {k: getattr(sv, k) for k in (*keys, "f_favail", "f_namemax")}

    def opendir(self, path: str) -> int:
        with self._op("opendir", path):
            fd = os.open(self._full(path), os.O_RDONLY | os.O_DIRECTORY)
            self.handles[fd] = Handle(self._oid_of(os.fstat(fd)), path)
        return fd

    def readdir(self, path: str | None, fh: int) -> list[tuple[str, dict[str, int], int]]:
        self._enter("readdir", self._hpath(path, fh))
        # With use_ino the kernel gets each entry's inode number from here (0 would hide it).
        here, parent = os.fstat(fh), os.stat("..", dir_fd=fh)
        items = [
            (".", {"st_ino": here.st_ino, "st_mode": stat.S_IFDIR}, 0),
            ("..", {"st_ino": parent.st_ino, "st_mode": stat.S_IFDIR}, 0),
        ]
        with os.scandir(fh) as entries:
            for entry in entries:
                if entry.is_symlink():
                    kind = stat.S_IFLNK
                elif entry.is_dir(follow_symlinks=False):
                    kind = stat.S_IFDIR
                else:
                    kind = stat.S_IFREG
                items.append((entry.name, {"st_ino": entry.inode(), "st_mode": kind}, 0))
        return items

    def releasedir(self, path: str | None, fh: int) -> int:
        with self.mutex:
            self.ops["releasedir"] += 1
            self.handles.pop(fh, None)
            os.close(fh)
        return 0

    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
        hpath = self._hpath(path, fh)
        with self._op("fsyncdir", hpath):
            obj = self.objs[self.handles[fh].oid]
            live = self._live_listing(fh)
            added = sorted(n for n in live if obj.entries.get(n) != live[n])
            removed = sorted(n for n in obj.entries if n not in live)
            obj.entries = live
            obj.mode = stat.S_IMODE(os.fstat(fh).st_mode)
            if added or removed:
                self._event("fsyncdir", path=hpath, added=added, removed=removed)
        return 0

    def open(self, path: str, flags: int) -> int:
        strip = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_APPEND | getattr(os, "O_DIRECT", 0)
        with self._op("open", path):
            fd = os.open(self._full(path), flags & ~strip)
            oid = self._oid_of(os.fstat(fd))
            self.handles[fd] = Handle(oid, path)
            if flags & os.O_TRUNC:
                self._mark_trunc(oid, 0)
        return fd

    def create(self, path: str, mode: int, flags: int = os.O_WRONLY) -> int:
        strip = os.O_APPEND | getattr(os, "O_DIRECT", 0)
        with self._op("create", path):
            fd = os.open(self._full(path), (flags & ~strip) | os.O_CREAT, stat.S_IMODE(mode))
            oid = self._oid_of(os.fstat(fd))
            self.handles[fd] = Handle(oid, path)
            if flags & os.O_TRUNC:
                self._mark_trunc(oid, 0)
        return fd

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        self._enter("read", self._hpath(path, fh))
        return os.pread(fh, size, offset)

    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        with self._op("write", self._hpath(path, fh)):
            n = os.pwrite(fh, data, offset)
            self._mark(self.handles[fh].oid, offset, offset + n)
        return n

    def flush(self, path: str | None, fh: int) -> int:
        self._enter("flush", self._hpath(path, fh))
        return 0

    def release(self, path: str | None, fh: int) -> int:
        with self.mutex:
            self.ops["release"] += 1
            self.handles.pop(fh, None)
            os.close(fh)
        return 0

    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        hpath = self._hpath(path, fh)
        with self._op("fsync", hpath):
            oid = self.handles[fh].oid
            if self.objs[oid].is_dirty or not self.objs[oid].snap:
                src = os.open(f"/proc/self/fd/{fh}", os.O_RDONLY)
                try:
                    copied = self._persist_data(oid, src)
                finally:
                    os.close(src)
                self._event("fsync", path=hpath, bytes=copied)
        return 0

    def mkdir(self, path: str, mode: int) -> int:
        with self._op("mkdir", path):
            full = self._full(path)
            os.mkdir(full, stat.S_IMODE(mode))
            self._oid_of(os.lstat(full))
        return 0

    def rmdir(self, path: str) -> int:
        with self._op("rmdir", path):
            full = self._full(path)
            st = os.lstat(full)
            os.rmdir(full)
            self._forget(st)
        return 0

    def unlink(self, path: str) -> int:
        with self._op("unlink", path):
            full = self._full(path)
            st = os.lstat(full)
            os.unlink(full)
            self._forget(st)
        return 0

    def rename(self, old: str, new: str, flags: int = 0) -> int:
        with self._op("rename", old, new):
            src, dst = self._full(old), self._full(new)
            try:
                replaced: os.stat_result | None = os.lstat(dst)
            except FileNotFoundError:
                replaced = None
            if flags:
                _renameat2(src, dst, flags)
            else:
                os.rename(src, dst)
            if replaced is not None and not flags & RENAME_EXCHANGE:
                if replaced.st_ino != os.lstat(dst).st_ino:
                    self._forget(replaced)
        return 0

    def link(self, target: str, source: str) -> int:
        with self._op("link", source, target):
            os.link(self._full(source), self._full(target))
        return 0

    def symlink(self, target: str, source: str) -> int:
        with self._op("symlink", target):
            full = self._full(target)
            os.symlink(source, full)
            self._oid_of(os.lstat(full), full)
        return 0

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        with self._op("truncate", self._hpath(path, fh)):
            if fh is not None:
                os.ftruncate(fh, length)
                oid = self.handles[fh].oid
            else:
                full = self._full(path or "/")
                os.truncate(full, length)
                oid = self._oid_of(os.lstat(full))
            self._mark_trunc(oid, length)
        return 0

    def fallocate(self, path: str | None, mode: int, offset: int, size: int, fh: int) -> int:
        with self._op("fallocate", self._hpath(path, fh)):
            if _libc.fallocate(fh, mode, offset, size) != 0:
                raise _fuse_error(ctypes.get_errno())
            self._mark(self.handles[fh].oid, offset, offset + size)
        return 0

    def chmod(self, path: str | None, mode: int, fh: int | None = None) -> int:
        with self._op("chmod", self._hpath(path, fh)):
            os.chmod(fh if fh is not None else self._full(path or "/"), stat.S_IMODE(mode))
        return 0

    def chown(self, path: str | None, uid: int, gid: int, fh: int | None = None) -> int:
        with self._op("chown", self._hpath(path, fh)):
            if fh is not None:
                os.chown(fh, uid, gid)
            else:
                os.lchown(self._full(path or "/"), uid, gid)
        return 0

    def utimens(
        self,
        path: str | None,
        times: tuple[tuple[int, int], tuple[int, int]] | None = None,
        fh: int | None = None,
    ) -> int:
        with self._op("utimens", self._hpath(path, fh)):
            target: int | str = fh if fh is not None else self._full(path or "/")
            follow = isinstance(target, int)  # follow_symlinks=False is refused for a descriptor
            if times is None:
                os.utime(target, follow_symlinks=follow)
                return 0
            st = os.stat(target, follow_symlinks=follow)
            now = time.time_ns()
            ns = []
            for (sec, nsec), current in zip(times, (st.st_atime_ns, st.st_mtime_ns), strict=True):
                value = sec * 10**9 + nsec
                ns.append(now if nsec == UTIME_NOW else current if nsec == UTIME_OMIT else value)
            os.utime(target, ns=(ns[0], ns[1]), follow_symlinks=follow)
        return 0

    def flock(self, path: str | None, fh: int, op: int) -> int:
        self._enter("flock", self._hpath(path, fh))
        if self.noflock:
            raise _fuse_error(self.noflock)
        if op & (fcntl.LOCK_NB | fcntl.LOCK_UN):
            fcntl.flock(fh, op)
            return 0
        # A blocking wait must not pin the caller in the kernel after it is killed (a killed
        # process waits for the answer to a request already sent): poll, and give up once the
        # caller has a SIGKILL pending or the power is off.
        pid = _caller_pid()
        while True:
            try:
                fcntl.flock(fh, op | fcntl.LOCK_NB)
                return 0
            except BlockingIOError:
                pass
            if self.dead:
                raise _fuse_error(errno.EIO)
            if pid and _being_killed(pid):
                raise _fuse_error(errno.EINTR)
            time.sleep(0.01)


RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.renameat2.argtypes = (
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint,
)
AT_FDCWD = -100


def _renameat2(src: str, dst: str, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) != 0:
        raise _fuse_error(ctypes.get_errno())


def _caller_pid() -> int:
    try:
        import mfusepy

        return mfusepy.fuse_get_context()[2]
    except Exception:
        return 0


def _being_killed(pid: int) -> bool:
    """True if `pid` is gone or has a SIGKILL pending."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    kill_bit = 1 << (signal.SIGKILL - 1)
    for line in text.splitlines():
        if line.startswith(("SigPnd:", "ShdPnd:")) and int(line.split()[1], 16) & kill_bit:
            return True
    return False


# ----- daemon --------------------------------------------------------------------------------


def _serve_control(ops: FaultOps, name: str) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind("\0" + name)
    server.listen(16)

    def handle(conn: socket.socket) -> None:
        with conn:
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                buf += chunk
            try:
                reply = ops.control(json.loads(buf))
            except Exception as exc:  # reported to the caller, the daemon keeps running
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            conn.sendall(json.dumps(reply).encode() + b"\n")

    def loop() -> None:
        while True:
            conn, _ = server.accept()
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return server


def _watch_parent(mount: str) -> None:
    """Unmount when the process that started us dies (no stale mount after a crashed test)."""
    parent = os.getppid()

    def loop() -> None:
        while os.getppid() == parent:
            time.sleep(0.3)
        subprocess.run(["fusermount3", "-uz", mount], capture_output=True, check=False)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=loop, daemon=True).start()


def _make_fuse_class() -> type:
    os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
    import mfusepy

    if mfusepy.fuse_version_major != 3:
        raise RuntimeError(f"faultfs needs libfuse 3, mfusepy loaded {mfusepy.fuse_version_major}")

    class FaultFUSE(mfusepy.FUSE):
        """mfusepy drops the handle of ftruncate/fchmod/futimens and rename flags, and needs a
        path for flock (with nullpath_ok there is none)."""

        def _dec(self, path: bytes | None) -> str | None:
            return None if path is None else path.decode(self.encoding, self.errors)

        @staticmethod
        def _fh(fip: Any) -> int | None:
            return fip.contents.fh if fip else None

        def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
            return self.operations.truncate(self._dec(path), length, self._fh(fip))

        def chmod_fuse_3(self, path: bytes | None, mode: int, fip: Any) -> int:
            return self.operations.chmod(self._dec(path), mode, self._fh(fip))

        def chown_fuse_3(self, path: bytes | None, uid: int, gid: int, fip: Any) -> int:
            uid = -1 if uid == 0xFFFFFFFF else uid
            gid = -1 if gid == 0xFFFFFFFF else gid
            return self.operations.chown(self._dec(path), uid, gid, self._fh(fip))

        def utimens_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> int:
            times = None
            if buf:
                a, m = buf.contents.actime, buf.contents.modtime
                times = ((a.tv_sec, a.tv_nsec), (m.tv_sec, m.tv_nsec))
            return self.operations.utimens(self._dec(path), times, self._fh(fip))

        def flock(self, path: bytes | None, fip: Any, op: int) -> int:
            return self.operations.flock(self._dec(path), fip.contents.fh, op)

        def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
            return self.operations.rename(self._dec(old), self._dec(new), flags)

    return FaultFUSE


def run_daemon(
    backing: Path,
    mount: Path,
    state: Path,
    ctl: str,
    model: str = "strict",
    watch_parent: bool = False,
) -> int:
    """Prepare the live tree, serve the control socket and the mount until unmounted."""
    os.umask(0)
    fuse_class = _make_fuse_class()
    ops = FaultOps(backing, state, model)
    ops.prepare()
    _serve_control(ops, ctl)
    if watch_parent:
        _watch_parent(str(mount))
    os.chdir("/")
    print(f"faultfs: serving {ops.root} on {mount} (control socket @{ctl})", flush=True)
    fuse_class(ops, str(mount), foreground=True, hard_remove=True, use_ino=True, fsname="faultfs")
    if not ops.dead and ops.mutex.acquire(timeout=5):
        ops.save_state(restore_needed=False)
    sys.stdout.flush()
    os._exit(0)  # libfuse's worker threads are gone; skip interpreter teardown


def control_call(ctl: str, request: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """Send one request to a daemon's control socket and return its reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect("\0" + ctl)
        sock.sendall(json.dumps(request).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            buf += chunk
    reply = json.loads(buf)
    if not reply.get("ok"):
        raise RuntimeError(f"faultfs {request.get('cmd')}: {reply.get('error')}")
    return reply


# ----- helper for harnesses and tests --------------------------------------------------------


def missing_prerequisites() -> list[str]:
    """What this machine lacks to mount a faultfs (empty when all is there)."""
    from ctypes.util import find_library
    from importlib.util import find_spec

    missing = []
    if not os.path.exists("/dev/fuse"):
        missing.append("/dev/fuse (the fuse kernel module)")
    if shutil.which("fusermount3") is None:
        missing.append("fusermount3 (Debian package fuse3)")
    if find_library("fuse3") is None:
        missing.append("libfuse3 (Debian package libfuse3-3, pulled in by fuse3)")
    if find_spec("mfusepy") is None:
        missing.append("the Python package mfusepy")
    return missing


def mount_entry(mount: Path | str) -> str | None:
    """The /proc/self/mountinfo line of `mount`, or None if nothing is mounted there."""
    target = os.path.abspath(mount)
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            fields = line.split()
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            if point == target:
                return line
    return None


def users_of(mount: Path | str) -> list[int]:
    """Pids (other than ours) with a cwd, root, open file or mapping under `mount`."""
    prefix = os.path.abspath(mount)
    me = os.getpid()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        links = [f"{entry.path}/cwd", f"{entry.path}/root"]
        with contextlib.suppress(OSError):
            links += [f"{entry.path}/fd/{fd}" for fd in os.listdir(f"{entry.path}/fd")]
        targets = []
        for link in links:
            with contextlib.suppress(OSError):
                targets.append(os.readlink(link))
        with contextlib.suppress(OSError), open(f"{entry.path}/maps") as maps:
            targets += [line.split(maxsplit=5)[-1].strip() for line in maps if "/" in line]
        if any(t == prefix or t.startswith(prefix + "/") for t in targets):
            found.append(pid)
    return found


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


class FaultFS:
    """Run faultfs on `mount` over `backing` in a child process and drive it.

    Use as a context manager (mounts on enter, unmounts on exit, even on error). A power-cut
    round: run the program on `mount` in its own session, SIGKILL its process group (or call
    `kill_users`) and reap it, then `cut()`: the mount comes back showing the durable image.
    """

    def __init__(
        self,
        backing: Path | str,
        mount: Path | str,
        *,
        state: Path | str | None = None,
        model: str = "strict",
        timeout: float = 20.0,
    ) -> None:
        self.backing = Path(backing).absolute()
        self.mount = Path(mount).absolute()
        self.state = (
            Path(state).absolute()
            if state is not None
            else self.backing.with_name(self.backing.name + ".faultfs")
        )
        self.model = model
        self.timeout = timeout
        self.ctl = f"faultfs-{os.getpid()}-{id(self):x}-{time.monotonic_ns()}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.state / "daemon.log"
        self._finalizer = weakref.finalize(self, _emergency_unmount, str(self.mount))

    # lifecycle

    def __enter__(self) -> FaultFS:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmount()

    def start(self) -> None:
        """Start the daemon and wait until the mount answers."""
        missing = missing_prerequisites()
        if missing:
            raise RuntimeError(f"faultfs cannot run, missing: {', '.join(missing)}; {INSTALL_HINT}")
        if self.proc is not None:
            raise RuntimeError("faultfs already running")
        entry = mount_entry(self.mount)
        if entry and entry.split(" - ", 1)[1].split()[1] == "faultfs":
            _emergency_unmount(str(self.mount))  # left over by a run that died
        elif entry:
            raise RuntimeError(f"something is already mounted on {self.mount}")
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mount.mkdir(parents=True, exist_ok=True)
        self.state.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            str(self.backing),
            str(self.mount),
            "--state",
            str(self.state),
            "--ctl",
            self.ctl,
            "--model",
            self.model,
            "--watch-parent",
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + self.timeout
        while True:
            if self.proc.poll() is not None:
                self.proc = None
                raise RuntimeError(f"faultfs daemon exited at start:\n{self._log_tail()}")
            with contextlib.suppress(OSError):
                if control_call(self.ctl, {"cmd": "ping"}, 2)["mounted"] and mount_entry(
                    self.mount
                ):
                    return
            if time.monotonic() > deadline:
                self.unmount()
                raise RuntimeError(f"faultfs did not mount in {self.timeout}s:\n{self._log_tail()}")
            time.sleep(0.02)

    def unmount(self) -> None:
        """Unmount (lazily if still busy) and stop the daemon; safe to call twice."""
        proc, self.proc = self.proc, None
        lazy = False
        if mount_entry(self.mount):
            done = subprocess.run(["fusermount3", "-u", str(self.mount)], capture_output=True)
            if done.returncode != 0 and mount_entry(self.mount):
                # Still busy: detach it; the daemon would serve the leftover users, so stop it.
                subprocess.run(["fusermount3", "-uz", str(self.mount)], capture_output=True)
                lazy = True
        if proc is not None:
            signals = (
                (signal.SIGTERM, signal.SIGKILL) if lazy else (None, signal.SIGTERM, signal.SIGKILL)
            )
            for sig in signals:
                if sig is not None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(sig)
                try:
                    proc.wait(timeout=5)
                    break
                except subprocess.TimeoutExpired:
                    continue
        _emergency_unmount(str(self.mount))

    @property
    def mounted(self) -> bool:
        return self.proc is not None and mount_entry(self.mount) is not None

    # control

    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.proc is None:
            raise RuntimeError("faultfs is not running")
        return control_call(self.ctl, request)

    def cut(self, seed: int | None = None, keep: float = 0.5) -> dict[str, Any]:
        """Power cut: drop every volatile write and pending namespace change, then remount.

        Kill every process using the mount first (`kill_users`). With a `seed`, each pending
        item is instead kept with probability `keep`. Returns what was kept and dropped:
        {"kept_data": [path], "dropped_data": [path], "kept_dirs": [{"path", "added",
        "removed"}], "dropped_dirs": [...], "seed": seed}.
        """
        summary = self._call({"cmd": "cut", "seed": seed, "keep": keep})
        self.unmount()
        self.start()
        summary.pop("ok", None)
        return summary

    def fault(
        self,
        op: str,
        path_glob: str = "*",
        errno_name: str = "EIO",
        nth: int = 1,
        every: bool = False,
    ) -> int:
        """Fail the `nth` call of `op` (name, "a,b" or "*") on a path matching `path_glob`
        (fnmatch on the path inside the mount, e.g. "/run/*.ckpt"; "re:<regex>" for a regex)
        with `errno_name`; with `every`, fail all matching calls from the nth on. Returns the
        rule's id. Rules survive cuts until `clear_faults`."""
        return int(
            self._call(
                {
                    "cmd": "fault",
                    "op": op,
                    "path": path_glob,
                    "errno": errno_name,
                    "nth": nth,
                    "every": every,
                }
            )["id"]
        )

    def clear_faults(self) -> None:
        self._call({"cmd": "clear_faults"})

    def no_flock(self, on: bool = True, errno_name: str = "ENOLCK") -> None:
        """Make flock() fail with `errno_name` (ENOLCK or EOPNOTSUPP), or work again."""
        self._call({"cmd": "noflock", "on": on, "errno": errno_name})

    def stats(self) -> dict[str, Any]:
        """Op counts of this daemon ("ops"), cumulative over remounts ("totals"), faults,
        cut summaries and the event log (fsync, fsyncdir, fault, cut)."""
        reply = self._call({"cmd": "stats"})
        reply.pop("ok", None)
        return reply

    def sync(self) -> dict[str, Any]:
        """Make everything durable now (like sync(1) on a real disk)."""
        reply = self._call({"cmd": "sync"})
        reply.pop("ok", None)
        return reply

    def kill_users(self, timeout: float = 10.0) -> list[int]:
        """SIGKILL every other process with a file, cwd or mapping in the mount; wait for them."""
        pids = [p for p in users_of(self.mount) if not self.proc or p != self.proc.pid]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.01)
        return pids

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-4000:]
        return ""


def _emergency_unmount(mount: str) -> None:
    if mount_entry(mount):
        subprocess.run(["fusermount3", "-uz", mount], capture_output=True, check=False)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "ctl":
        parser = argparse.ArgumentParser(prog="faultfs.py ctl")
        parser.add_argument("name", help="control socket name printed by the daemon")
        parser.add_argument("request", help='JSON, e.g. \'{"cmd": "stats"}\'')
        args = parser.parse_args(argv[1:])
        print(json.dumps(control_call(args.name, json.loads(args.request)), indent=1))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("backing", type=Path)
    parser.add_argument("mount", type=Path)
    parser.add_argument("--state", type=Path, help="durable image (default BACKING.faultfs)")
    parser.add_argument("--ctl", default=f"faultfs-{os.getpid()}", help="control socket name")
    parser.add_argument("--model", choices=["strict", "sync"], default="strict")
    parser.add_argument("--watch-parent", action="store_true")
    args = parser.parse_args(argv)
    state = args.state or args.backing.with_name(args.backing.name + ".faultfs")
    return run_daemon(args.backing, args.mount, state, args.ctl, args.model, args.watch_parent)


if __name__ == "__main__":
    sys.exit(main())
