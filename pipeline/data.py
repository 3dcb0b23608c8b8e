"""The data stage: load MNIST-like images, check them, slice, hold out validation, cache per run.

Sources, in order: `data.path` (a Keras-layout .npz, or a directory of IDX files, gzipped or
not); else Keras' own cache/download; else, when offline, the real-MNIST sample shipped in this
package, with a loud warning. The prepared arrays stay uint8 on disk and in memory: models take
raw pixels and own their preprocessing (pipeline/models), so the data stage never normalizes; it
records the training slice's pixel mean and std for models that standardize.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import durable, rundir
from pipeline.config import DataConfig, Dataset
from pipeline.errors import PipelineError
from pipeline.models import Pixels
from pipeline.rundir import PREPARED

if TYPE_CHECKING:
    from pipeline.stages import Context

log = logging.getLogger(__name__)

SAMPLE_PATH = Path(__file__).parent / "sample" / "mnist_sample.npz"
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
SPLITS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")


class DataError(PipelineError):
    pass


@dataclass
class Prepared:
    """The sliced uint8 arrays of one run, and its training pixels' mean and std (in [0, 1])."""

    arrays: dict[str, np.ndarray]
    mean: float
    std: float
    fingerprint: str
    source: str
    source_sha256: str
    directory: Path  # the committed cache directory the arrays were read from or written to

    def pixels(self, normalize: str) -> Pixels:
        """How a model turns these raw pixels into its input (models own their preprocessing)."""
        return Pixels(str(normalize), self.mean, self.std)


# ---------------------------------------------------------------- reading sources


def read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in IDX_FILES if k not in npz.files]
            if missing:
                raise DataError(
                    f"{path} is not a Keras-layout MNIST file: keys {missing} are "
                    f"missing (it has {sorted(npz.files)}); expected x_train, "
                    "y_train, x_test, y_test"
                )
            return {k: npz[k] for k in IDX_FILES}
    except DataError:
        raise
    except Exception as exc:  # numpy/zipfile/zlib raise many types for a damaged archive
        raise DataError(
            f"{path} cannot be read as .npz ({exc}); is it truncated? "
            "Download it again or point data.path at a good copy"
        ) from exc


def _open_idx(directory: Path, stem: str) -> tuple[Path, bytes]:
    for name in (
        stem,
        stem + ".gz",
        stem.replace("-idx", ".idx"),
        stem.replace("-idx", ".idx") + ".gz",
    ):
        path = directory / name
        if path.is_file():
            raw = path.read_bytes()
            if name.endswith(".gz"):
                try:
                    raw = gzip.decompress(raw)
                except (OSError, EOFError) as exc:
                    raise DataError(
                        f"{path} is not a valid gzip file ({exc}); download it again"
                    ) from exc
            return path, raw
    raise DataError(
        f"{directory} has no {stem} or {stem}.gz; an IDX directory needs "
        f"{', '.join(IDX_FILES.values())} (optionally .gz)"
    )


def parse_idx(raw: bytes, path: Path, dims: int) -> np.ndarray:
    """Parse one IDX file of unsigned bytes with `dims` dimensions, checking its header."""
    if len(raw) < 4 + 4 * dims:
        raise DataError(f"{path} is too short for an IDX header ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x800 + dims:
        raise DataError(
            f"{path} has a bad IDX magic number 0x{magic:08x}; expected "
            f"0x{0x800 + dims:08x} (unsigned bytes, {dims} dimensions)"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    body = raw[4 + 4 * dims :]
    expected = int(np.prod(shape))
    if len(body) != expected:
        raise DataError(
            f"{path}: its header says {shape} = {expected} bytes of data, but it "
            f"holds {len(body)}; the file is truncated or damaged"
        )
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def read_idx_dir(directory: Path) -> tuple[dict[str, np.ndarray], list[Path]]:
    arrays, paths = {}, []
    for key, stem in IDX_FILES.items():
        path, raw = _open_idx(directory, stem)
        arrays[key] = parse_idx(raw, path, 3 if key.startswith("x") else 1)
        paths.append(path)
    return arrays, paths


def check_arrays(arrays: dict[str, np.ndarray], origin: str) -> None:
    """Images must be N×28×28 uint8-valued, labels N integers in 0–9, counts matching."""
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or x.shape[1:] != (28, 28):
            raise DataError(f"{origin}: x_{split} has shape {x.shape}; expected N×28×28 images")
        if x.dtype != np.uint8 and (
            not np.issubdtype(x.dtype, np.number)
            or x.min() < 0
            or x.max() > 255
            or not np.array_equal(x, np.round(x))
        ):
            raise DataError(
                f"{origin}: x_{split} must hold whole pixel values 0–255 as MNIST "
                f"does (dtype {x.dtype}, range {x.min()}–{x.max()}); images already "
                "scaled to [0, 1] must be multiplied by 255 first"
            )
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(f"{origin}: y_{split} has shape {y.shape}; expected {len(x)} labels")
        if not np.issubdtype(y.dtype, np.integer) or (len(y) and (y.min() < 0 or y.max() > 9)):
            bad = y[(y < 0) | (y > 9)][:3] if np.issubdtype(y.dtype, np.number) else y[:3]
            raise DataError(f"{origin}: y_{split} has labels outside 0–9 (e.g. {bad.tolist()})")


def hash_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(durable.sha256_file(path).encode())
    return digest.hexdigest()


def hash_arrays(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in sorted(arrays):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(arrays[key]).tobytes())
    return digest.hexdigest()


def _keras_download(name: str) -> dict[str, np.ndarray]:
    import keras  # imported here: only this source needs it

    module = getattr(keras.datasets, name)
    (x_train, y_train), (x_test, y_test) = module.load_data()
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def _bundled_sample() -> tuple[dict[str, np.ndarray], str, str]:
    return read_npz(SAMPLE_PATH), hash_files([SAMPLE_PATH]), f"bundled sample {SAMPLE_PATH.name}"


def _download(name: str, offline_sample: bool) -> tuple[dict[str, np.ndarray], str, str]:
    """Keras' cached or downloaded copy; offline, the bundled sample if `offline_sample`."""
    try:
        arrays = _keras_download(name)
    except Exception as exc:  # Keras raises a bare Exception for a failed download
        if not offline_sample:
            raise DataError(
                f"Could not download {name} ({exc}). Download it on a machine "
                "with internet access and pass data.path=<file.npz or IDX dir>"
            ) from exc
        log.warning(
            "\n%s\nOFFLINE: could not download MNIST (%s).\nTraining on the SMALL sample "
            "shipped with the package (%s), not the full dataset.\nFor the full set, copy "
            "mnist.npz from a machine with internet access and pass data.path=/path/to/"
            "mnist.npz, or put it in ~/.keras/datasets/.\n%s",
            "!" * 78,
            type(exc).__name__,
            SAMPLE_PATH.name,
            "!" * 78,
        )
        arrays, digest, origin = _bundled_sample()
        return arrays, digest, f"{origin} (offline)"
    check_arrays(arrays, f"Keras {name} download")
    return arrays, hash_arrays(arrays), f"Keras {name} cache"


# data=<name> without data.path: where each dataset comes from (a test checks every Dataset has
# an entry). Any MNIST-shaped dataset also works through data.path with no entry at all.
SOURCES: dict[Dataset, Callable[[], tuple[dict[str, np.ndarray], str, str]]] = {
    Dataset.mnist: lambda: _download("mnist", offline_sample=True),
    Dataset.fashion_mnist: lambda: _download("fashion_mnist", offline_sample=False),
    Dataset.sample: _bundled_sample,
}


def load_source(name: str, path: str | None) -> tuple[dict[str, np.ndarray], str, str]:
    """Return (arrays, content fingerprint, description of the source)."""
    if path:
        source = Path(path).expanduser()
        if source.is_dir():
            arrays, files = read_idx_dir(source)
            origin = f"IDX files in {source}"
        elif source.is_file():
            arrays, files = read_npz(source), [source]
            origin = str(source)
        else:
            raise DataError(
                f"data.path={path} does not exist. Give a Keras-layout .npz file "
                "or a directory of IDX files, or leave data.path unset to download"
            )
        check_arrays(arrays, origin)
        return arrays, hash_files(files), origin
    return SOURCES[Dataset(name)]()


# ---------------------------------------------------------------- preparing and caching


def split(
    arrays: dict[str, np.ndarray],
    train_size: int | None,
    test_size: int | None,
    val_fraction: float,
) -> dict[str, np.ndarray]:
    """First `train_size` training images (the last `val_fraction` of them held out), first
    `test_size` test images; all as uint8 and int64 labels."""
    x_train = arrays["x_train"][:train_size].astype(np.uint8, copy=False)
    y_train = arrays["y_train"][:train_size].astype(np.int64, copy=False)
    cut = len(x_train) - int(round(len(x_train) * val_fraction))
    if cut < 1:
        raise DataError(
            f"data.val_fraction={val_fraction} leaves no training images (the "
            f"training slice has {len(x_train)}); lower it or raise data.train_size"
        )
    return {
        "x_train": x_train[:cut],
        "y_train": y_train[:cut],
        "x_val": x_train[cut:],
        "y_val": y_train[cut:],
        "x_test": arrays["x_test"][:test_size].astype(np.uint8, copy=False),
        "y_test": arrays["y_test"][:test_size].astype(np.int64, copy=False),
    }


def pixel_stats(x_train: np.ndarray) -> tuple[float, float]:
    """Mean and std of training pixels scaled to [0, 1], computed without a float64 copy."""
    counts = np.bincount(x_train.reshape(-1), minlength=256).astype(np.float64)
    values = np.arange(256) / 255.0
    mean = float((counts * values).sum() / counts.sum())
    std = float(np.sqrt((counts * (values - mean) ** 2).sum() / counts.sum()))
    return mean, std


def prepare(
    name: str,
    path: str | None,
    train_size: int | None,
    test_size: int | None,
    val_fraction: float,
    cache_root: Path,
) -> Prepared:
    """Load, check and slice the data; keep it once per content in `cache_root/<fingerprint>`.

    Runs of the same data share one verified copy (a sweep does not store the dataset once per
    run). Processes preparing the same data at once take turns (a flock per entry): the first
    writes, the others read its committed copy. A copy that fails verification is set aside and
    prepared again.
    """
    arrays, source_hash, origin = load_source(name, path)
    recipe = {
        "name": name,
        "train_size": train_size,
        "test_size": test_size,
        "val_fraction": val_fraction,
    }
    fingerprint = hashlib.sha256(f"{source_hash}:{sorted(recipe.items())}".encode()).hexdigest()
    cache_dir = cache_root / fingerprint[:FINGERPRINT_CHARS]
    with _cache_lock(cache_root, cache_dir.name):
        durable.remove_temps_of(cache_dir)  # a killed writer's (the lock says none is alive)
        meta = _read_cache_meta(cache_dir) if cache_dir.exists() else None
        if meta is not None and meta["fingerprint"] == fingerprint:
            with durable.naming(cache_dir / PREPARED), np.load(cache_dir / PREPARED) as npz:
                cached = {k: npz[k] for k in SPLITS}
            log.info("Data: reusing the prepared data in %s", cache_dir)
            return Prepared(
                cached, meta["mean"], meta["std"], fingerprint, origin, source_hash, cache_dir
            )
        splits = split(arrays, train_size, test_size, val_fraction)
        mean, std = pixel_stats(splits["x_train"])
        _write_cache(
            cache_dir,
            splits,
            {
                "source": origin,
                "source_sha256": source_hash,
                "recipe": recipe,
                "mean": mean,
                "std": std,
                "fingerprint": fingerprint,
            },
        )
    log.info(
        "Data: %s -> %d train, %d validation, %d test images (prepared in %s)",
        origin,
        len(splits["x_train"]),
        len(splits["x_val"]),
        len(splits["x_test"]),
        cache_dir,
    )
    return Prepared(splits, mean, std, fingerprint, origin, source_hash, cache_dir)


# Enough of the sha256 to name a cache entry (a collision would still fail the meta check).
FINGERPRINT_CHARS = 20


@contextlib.contextmanager
def _cache_lock(cache_root: Path, key: str) -> Iterator[None]:
    """Block until no other process prepares the entry `key` (the kernel frees a dead one's)."""
    durable.make_dirs(cache_root)
    fd = os.open(cache_root / f".{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def check_same_source(recorded: dict | None, prepared: Prepared) -> None:
    """Refuse data whose source content changed under a run (its data record says what it was
    prepared from): the recipe is part of the run's identity, so a new fingerprint means new
    content, and a resumed fit on other images would not be the run it continues."""
    if recorded is None or recorded["fingerprint"] == prepared.fingerprint:
        return
    was = recorded.get("source_sha256", recorded["fingerprint"])[:12]
    raise DataError(
        f"The data source changed under this run: {prepared.source} now has content "
        f"{prepared.source_sha256[:12]}, but the run was prepared from {recorded['source']} "
        f"with content {was}. Use the original data, or start a new run with run.name=<new> "
        "(or run.restart=true)"
    )


def prepare_run_data(cfg: DataConfig, cache_root: Path) -> Prepared:
    """`prepare` with a run's data config."""
    return prepare(
        str(cfg.name), cfg.path, cfg.train_size, cfg.test_size, cfg.val_fraction, cache_root
    )


def _read_cache_meta(cache_dir: Path) -> dict | None:
    try:
        return durable.verify_dir(cache_dir)
    except durable.CorruptArtifact as exc:
        moved = durable.set_aside(cache_dir)
        log.warning(
            "Prepared data failed verification (%s); set aside as %s and rebuilt", exc, moved
        )
        return None


def _write_cache(cache_dir: Path, splits: dict[str, np.ndarray], meta: dict) -> None:
    if cache_dir.exists():
        durable.set_aside(cache_dir)
    durable.write_dir(
        cache_dir,
        lambda tmp: np.savez(tmp / PREPARED, **splits),  # type: ignore[arg-type]
        meta,
        size_hint=sum(a.nbytes for a in splits.values()),
    )


# ---------------------------------------------------------------- the stage


def is_done(ctx: Context) -> str | None:
    """Never: every later stage needs the arrays in memory, so the data stage always runs (a
    finished one only reads its verified cache entry)."""
    return None


def run(ctx: Context) -> dict[str, Any] | None:
    """Prepare (or read) the run's data into `ctx.prepared`; the record only when it changed."""
    done = ctx.run.read_stage("data", owner=True)
    prepared = prepare_run_data(ctx.cfg.data, rundir.data_cache(Path(ctx.cfg.run.outputs)))
    check_same_source(done, prepared)
    ctx.prepared = prepared
    record = {
        "fingerprint": prepared.fingerprint,
        "source": prepared.source,
        "source_sha256": prepared.source_sha256,
        "cache": rundir.relative_to_run(ctx.run, prepared.directory),
    }
    if done is None or any(done.get(k) != v for k, v in record.items()):
        return record
    return None
