"""pipeline.data: reading .npz and IDX sources, checks, split, stats, the per-run cache."""

from __future__ import annotations

import gzip
import hashlib
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import data, durable
from pipeline.data import DataError

IDX_NAMES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]
KEYS = ["x_train", "y_train", "x_test", "y_test"]


@pytest.fixture
def arrays() -> dict[str, np.ndarray]:
    """A small MNIST-shaped set: 60 training and 20 test images, labels cycling 0-9."""
    rng = np.random.default_rng(1234)
    return {
        "x_train": rng.integers(0, 256, (60, 28, 28), dtype=np.uint8),
        "y_train": (np.arange(60) * 7 % 10).astype(np.uint8),
        "x_test": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        "y_test": (np.arange(20) % 10).astype(np.uint8),
    }


def idx_bytes(arr: np.ndarray, magic: int | None = None) -> bytes:
    header = (magic if magic is not None else 0x800 + arr.ndim).to_bytes(4, "big")
    header += b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()


def write_idx_dir(directory: Path, arrays: dict[str, np.ndarray], gz: bool) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, name in zip(KEYS, IDX_NAMES, strict=True):
        raw = idx_bytes(arrays[key])
        path = directory / (name + ".gz" if gz else name)
        path.write_bytes(gzip.compress(raw) if gz else raw)
        paths.append(path)
    return paths


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez(path, **arrays)
    return path


def expected_hash(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(hashlib.sha256(path.read_bytes()).hexdigest().encode())
    return digest.hexdigest()


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert np.array_equal(a[key], b[key]), key


# ---------------------------------------------------------------- IDX files


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_idx_directory_loads(tmp_path: Path, arrays: dict[str, np.ndarray], gz: bool) -> None:
    paths = write_idx_dir(tmp_path / "idx", arrays, gz)
    loaded, fingerprint, origin = data.load_source("mnist", str(tmp_path / "idx"))
    assert_same(loaded, arrays)
    assert loaded["x_train"].dtype == np.uint8
    assert origin == f"IDX files in {tmp_path / 'idx'}"
    assert fingerprint == expected_hash(paths)


def test_idx_dotted_names_are_accepted(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    """The other common spelling: train-images.idx3-ubyte (here mixed plain and gzipped)."""
    directory = tmp_path / "idx"
    directory.mkdir()
    for i, (key, name) in enumerate(zip(KEYS, IDX_NAMES, strict=True)):
        raw = idx_bytes(arrays[key])
        dotted = name.replace("-idx", ".idx")
        if i % 2:
            (directory / (dotted + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (directory / dotted).write_bytes(raw)
    loaded, _, _ = data.load_source("mnist", str(directory))
    assert_same(loaded, arrays)


def test_idx_bad_magic(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    write_idx_dir(tmp_path, arrays, gz=False)
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(idx_bytes(arrays["x_train"], magic=0x00000804))
    with pytest.raises(DataError) as info:
        data.read_idx_dir(tmp_path)
    assert str(info.value) == (
        f"{bad} has a bad IDX magic number 0x00000804; expected "
        "0x00000803 (unsigned bytes, 3 dimensions)"
    )


def test_idx_labels_with_image_magic(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    write_idx_dir(tmp_path, arrays, gz=True)
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(idx_bytes(arrays["y_test"], magic=0x803)))
    with pytest.raises(DataError) as info:
        data.read_idx_dir(tmp_path)
    assert str(info.value) == (
        f"{bad} has a bad IDX magic number 0x00000803; expected "
        "0x00000801 (unsigned bytes, 1 dimensions)"
    )


@pytest.mark.parametrize("delta", [-1, +5])
def test_idx_size_not_matching_header(
    tmp_path: Path, arrays: dict[str, np.ndarray], delta: int
) -> None:
    write_idx_dir(tmp_path, arrays, gz=False)
    bad = tmp_path / "t10k-images-idx3-ubyte"
    raw = idx_bytes(arrays["x_test"])
    bad.write_bytes(raw[:delta] if delta < 0 else raw + b"\0" * delta)
    with pytest.raises(DataError) as info:
        data.read_idx_dir(tmp_path)
    assert str(info.value) == (
        f"{bad}: its header says (20, 28, 28) = 15680 bytes of data, but "
        f"it holds {15680 + delta}; the file is truncated or damaged"
    )


def test_idx_too_short_for_header(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        data.parse_idx(b"\x00\x00\x08\x03\x00\x00", Path("f"), 3)
    assert str(info.value) == "f is too short for an IDX header (6 bytes)"


@pytest.mark.parametrize("damage", ["not gzip", "truncated gzip"])
def test_idx_broken_gzip(tmp_path: Path, arrays: dict[str, np.ndarray], damage: str) -> None:
    write_idx_dir(tmp_path, arrays, gz=True)
    bad = tmp_path / "train-labels-idx1-ubyte.gz"
    raw = bad.read_bytes()
    bad.write_bytes(b"this is not gzip" if damage == "not gzip" else raw[: len(raw) // 2])
    with pytest.raises(DataError) as info:
        data.read_idx_dir(tmp_path)
    assert str(info.value).startswith(f"{bad} is not a valid gzip file (")
    assert str(info.value).endswith("); download it again")


def test_idx_missing_file(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    write_idx_dir(tmp_path, arrays, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError) as info:
        data.load_source("mnist", str(tmp_path))
    assert str(info.value) == (
        f"{tmp_path} has no t10k-labels-idx1-ubyte or t10k-labels-idx1-ubyte.gz; an IDX "
        "directory needs train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (optionally .gz)"
    )


# ---------------------------------------------------------------- .npz files


def test_npz_loads(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    path = write_npz(tmp_path / "mnist.npz", {**arrays, "extra": np.zeros(3)})
    loaded, fingerprint, origin = data.load_source("mnist", str(path))
    assert_same(loaded, arrays)  # extra keys are ignored
    assert origin == str(path)
    assert fingerprint == expected_hash([path])


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.1, 0.0])
def test_npz_truncated(tmp_path: Path, arrays: dict[str, np.ndarray], keep: float) -> None:
    path = write_npz(tmp_path / "mnist.npz", arrays)
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(DataError) as info:
        data.load_source("mnist", str(path))
    message = str(info.value)
    assert message.startswith(f"{path} cannot be read as .npz (")
    assert message.endswith(
        "); is it truncated? Download it again or point data.path at a good copy"
    )


def test_npz_wrong_keys(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    path = write_npz(
        tmp_path / "mnist.npz",
        {"images": arrays["x_train"], "labels": arrays["y_train"], "x_test": arrays["x_test"]},
    )
    with pytest.raises(DataError) as info:
        data.load_source("mnist", str(path))
    assert str(info.value) == (
        f"{path} is not a Keras-layout MNIST file: keys ['x_train', 'y_train', 'y_test'] are "
        "missing (it has ['images', 'labels', 'x_test']); expected x_train, y_train, x_test, "
        "y_test"
    )


def test_missing_data_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.npz"
    with pytest.raises(DataError) as info:
        data.load_source("mnist", str(missing))
    assert str(info.value) == (
        f"data.path={missing} does not exist. Give a Keras-layout .npz file or a directory of "
        "IDX files, or leave data.path unset to download"
    )


# ---------------------------------------------------------------- content checks


@pytest.mark.parametrize(
    "key,bad_labels,shown",
    [
        ("y_train", {5: 10}, "10"),
        ("y_test", {0: 255}, "255"),
    ],
)
def test_labels_outside_range(
    tmp_path: Path, arrays: dict[str, np.ndarray], key: str, bad_labels: dict[int, int], shown: str
) -> None:
    labels = arrays[key].copy()
    for index, value in bad_labels.items():
        labels[index] = value
    path = write_npz(tmp_path / "mnist.npz", {**arrays, key: labels})
    with pytest.raises(DataError) as info:
        data.load_source("mnist", str(path))
    message = str(info.value)
    assert message.startswith(f"{path}: {key} has labels outside 0–9 (e.g. [")
    assert shown in message


def test_negative_labels(arrays: dict[str, np.ndarray]) -> None:
    y = arrays["y_train"].astype(np.int64)
    y[3] = -1
    with pytest.raises(DataError, match=r"^src: y_train has labels outside 0–9 \(e\.g\. \["):
        data.check_arrays({**arrays, "y_train": y}, "src")


def test_float_labels_refused(arrays: dict[str, np.ndarray]) -> None:
    with pytest.raises(DataError, match="^src: y_test has labels outside 0–9"):
        data.check_arrays({**arrays, "y_test": arrays["y_test"].astype(np.float32)}, "src")


@pytest.mark.parametrize(
    "key,shape",
    [
        ("x_train", (60, 784)),
        ("x_train", (60, 28, 27)),
        ("x_test", (20, 28, 28, 1)),
    ],
)
def test_images_of_wrong_shape(
    tmp_path: Path, arrays: dict[str, np.ndarray], key: str, shape: tuple[int, ...]
) -> None:
    images = np.zeros(shape, dtype=np.uint8)
    path = write_npz(tmp_path / "mnist.npz", {**arrays, key: images})
    with pytest.raises(DataError) as info:
        data.load_source("mnist", str(path))
    assert str(info.value) == f"{path}: {key} has shape {shape}; expected N×28×28 images"


def test_label_count_not_matching_images(arrays: dict[str, np.ndarray]) -> None:
    with pytest.raises(DataError) as info:
        data.check_arrays({**arrays, "y_train": arrays["y_train"][:59]}, "src")
    assert str(info.value) == "src: y_train has shape (59,); expected 60 labels"


def test_pixel_values_outside_byte_range(arrays: dict[str, np.ndarray]) -> None:
    x = arrays["x_train"].astype(np.int32)
    x[0, 0, 0] = 256
    with pytest.raises(DataError) as info:
        data.check_arrays({**arrays, "x_train": x}, "src")
    assert str(info.value).startswith(
        "src: x_train must hold whole pixel values 0–255 as MNIST does (dtype int32, range 0–256)"
    )


def test_wider_integer_pixels_in_range_are_accepted(arrays: dict[str, np.ndarray]) -> None:
    data.check_arrays({**arrays, "x_train": arrays["x_train"].astype(np.int64)}, "src")


# ---------------------------------------------------------------- split and stats


def test_split_sizes_and_contents(arrays: dict[str, np.ndarray]) -> None:
    arrays = {**arrays, "y_train": arrays["y_train"].astype(np.int32)}
    out = data.split(arrays, train_size=40, test_size=15, val_fraction=0.25)
    assert list(out) == list(data.SPLITS)
    assert {k: v.shape for k, v in out.items()} == {
        "x_train": (30, 28, 28),
        "y_train": (30,),
        "x_val": (10, 28, 28),
        "y_val": (10,),
        "x_test": (15, 28, 28),
        "y_test": (15,),
    }
    assert {k: v.dtype for k, v in out.items()} == {
        "x_train": np.uint8,
        "y_train": np.int64,
        "x_val": np.uint8,
        "y_val": np.int64,
        "x_test": np.uint8,
        "y_test": np.int64,
    }
    assert np.array_equal(out["x_train"], arrays["x_train"][:30])
    assert np.array_equal(out["y_train"], arrays["y_train"][:30])
    assert np.array_equal(out["x_val"], arrays["x_train"][30:40])
    assert np.array_equal(out["y_val"], arrays["y_train"][30:40])
    assert np.array_equal(out["x_test"], arrays["x_test"][:15])
    assert np.array_equal(out["y_test"], arrays["y_test"][:15])


@pytest.mark.parametrize(
    "train_size,test_size,fraction,sizes",
    [
        (None, None, 0.1, (54, 6, 20)),  # None: everything
        (None, 5, 0.0, (60, 0, 5)),  # no validation at all
        (50, None, 0.1, (45, 5, 20)),
        (30, 100, 0.05, (28, 2, 20)),  # 1.5 rounds to 2; test_size larger than the set
        (7, None, 0.5, (3, 4, 20)),  # 3.5 rounds to 4
    ],
)
def test_split_sizes(
    arrays: dict[str, np.ndarray],
    train_size: int | None,
    test_size: int | None,
    fraction: float,
    sizes: tuple[int, int, int],
) -> None:
    out = data.split(arrays, train_size, test_size, fraction)
    assert (len(out["x_train"]), len(out["x_val"]), len(out["x_test"])) == sizes
    assert (len(out["y_train"]), len(out["y_val"]), len(out["y_test"])) == sizes


def test_pixel_stats_exact_values() -> None:
    x = np.zeros((2, 28, 28), dtype=np.uint8)
    x[1] = 255
    assert data.pixel_stats(x) == (0.5, 0.5)
    assert data.pixel_stats(np.full((1, 28, 28), 51, dtype=np.uint8)) == pytest.approx((0.2, 0.0))


def test_pixel_stats_match_float64_computation(arrays: dict[str, np.ndarray]) -> None:
    scaled = arrays["x_train"].astype(np.float64) / 255.0
    mean, std = data.pixel_stats(arrays["x_train"])
    assert mean == pytest.approx(scaled.mean(), rel=1e-12)
    assert std == pytest.approx(scaled.std(), rel=1e-12)


# ---------------------------------------------------------------- prepare and its cache


def prepare(path: Path, cache: Path, **overrides):
    args = {"train_size": 50, "test_size": 10, "val_fraction": 0.2}
    args.update(overrides)
    return data.prepare(
        "mnist", str(path), args["train_size"], args["test_size"], args["val_fraction"], cache
    )


def test_prepare_writes_a_verified_cache(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    source = write_npz(tmp_path / "mnist.npz", arrays)
    root = tmp_path / "outputs" / ".cache" / "data"
    prepared = prepare(source, root)
    assert {k: len(v) for k, v in prepared.arrays.items()} == {
        "x_train": 40,
        "y_train": 40,
        "x_val": 10,
        "y_val": 10,
        "x_test": 10,
        "y_test": 10,
    }
    mean, std = data.pixel_stats(arrays["x_train"][:40])
    assert (prepared.mean, prepared.std) == (mean, std)
    assert prepared.source == str(source)
    assert prepared.directory == root / prepared.fingerprint[: data.FINGERPRINT_CHARS]
    meta = durable.verify_dir(prepared.directory)
    assert meta["source_sha256"] == prepared.source_sha256 == expected_hash([source])
    assert meta["fingerprint"] == prepared.fingerprint
    assert meta["recipe"] == {
        "name": "mnist",
        "train_size": 50,
        "test_size": 10,
        "val_fraction": 0.2,
    }
    assert sorted(p.name for p in prepared.directory.iterdir()) == ["MANIFEST.json", "prepared.npz"]


def test_prepared_data_stays_raw_pixels(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    # Models own their preprocessing: the data stage never scales or normalizes.
    source = write_npz(tmp_path / "mnist.npz", arrays)
    prepared = prepare(source, tmp_path / "cache")
    assert prepared.arrays["x_train"].dtype == np.uint8
    assert np.array_equal(prepared.arrays["x_train"], arrays["x_train"][:40])


def test_prepare_reuses_cache(
    tmp_path: Path, arrays: dict[str, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    source = write_npz(tmp_path / "mnist.npz", arrays)
    root = tmp_path / "cache"
    first = prepare(source, root)
    cached_file = first.directory / "prepared.npz"
    before = cached_file.stat()
    with caplog.at_level(logging.INFO, logger="pipeline.data"):
        second = prepare(source, root)
    assert f"Data: reusing the prepared data in {first.directory}" in caplog.messages
    after = cached_file.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert (second.mean, second.std, second.fingerprint, second.source) == (
        first.mean,
        first.std,
        first.fingerprint,
        first.source,
    )
    assert_same(second.arrays, first.arrays)
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == [
        first.directory.name
    ]


def test_prepare_keeps_one_entry_per_recipe(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    source = write_npz(tmp_path / "mnist.npz", arrays)
    root = tmp_path / "cache"
    first = prepare(source, root)
    second = prepare(source, root, val_fraction=0.4)
    assert len(second.arrays["x_val"]) == 20 and len(second.arrays["x_train"]) == 30
    assert second.fingerprint != first.fingerprint
    assert durable.verify_dir(second.directory)["recipe"]["val_fraction"] == 0.4
    assert durable.verify_dir(first.directory)["recipe"]["val_fraction"] == 0.2  # both kept


def recorded(prepared: data.Prepared) -> dict:
    """What a run's data record keeps of the data it was prepared from."""
    return {
        "fingerprint": prepared.fingerprint,
        "source": prepared.source,
        "source_sha256": prepared.source_sha256,
    }


def test_a_run_refuses_a_changed_source(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    source = write_npz(tmp_path / "mnist.npz", arrays)
    first = prepare(source, tmp_path / "cache")
    old = expected_hash([source])
    changed = arrays["x_train"].copy()
    changed[0, 0, 0] ^= 1
    write_npz(source, {**arrays, "x_train": changed})
    new = expected_hash([source])
    second = prepare(source, tmp_path / "cache")
    with pytest.raises(DataError) as info:
        data.check_same_source(recorded(first), second)
    assert str(info.value).startswith(
        f"The data source changed under this run: {source} now has content {new[:12]}, but the "
        f"run was prepared from {source} with content {old[:12]}. Use the original data, or "
        "start a new run with run.name=<new> (or run.restart=true)"
    )
    assert durable.verify_dir(first.directory)["source_sha256"] == old  # the old copy stays
    data.check_same_source(recorded(first), first)
    data.check_same_source(None, second)  # a new run takes any data


def test_a_run_refuses_a_changed_idx_source(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    write_idx_dir(tmp_path / "idx", arrays, gz=True)
    first = prepare(tmp_path / "idx", tmp_path / "cache")
    labels = arrays["y_test"].copy()
    labels[0] = (labels[0] + 1) % 10
    (tmp_path / "idx" / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    second = prepare(tmp_path / "idx", tmp_path / "cache")
    with pytest.raises(DataError, match=r"^The data source changed under this run: IDX files in "):
        data.check_same_source(recorded(first), second)


def test_prepare_sets_aside_corrupt_cache(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    source = write_npz(tmp_path / "mnist.npz", arrays)
    root = tmp_path / "cache"
    first = prepare(source, root)
    npz = first.directory / "prepared.npz"
    raw = bytearray(npz.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    npz.write_bytes(bytes(raw))
    second = prepare(source, root)
    assert_same(second.arrays, first.arrays)
    name = first.directory.name
    entries = sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock"))
    assert entries == [name, f"{name}.corrupt"]
    durable.verify_dir(first.directory)


PREPARE_IN_A_PROCESS = """
import sys
from pathlib import Path
from pipeline import data
prepared = data.prepare("mnist", sys.argv[1], 50, 10, 0.2, Path(sys.argv[2]))
print(prepared.directory)
"""


def test_processes_preparing_the_same_data_at_once_share_one_copy(
    tmp_path: Path, arrays: dict[str, np.ndarray]
) -> None:
    """A parallel sweep: four processes prepare the same data at the same moment; they take
    turns on the entry's lock, one writes, the others read its committed copy."""
    source = write_npz(tmp_path / "mnist.npz", arrays)
    root = tmp_path / "cache"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PREPARE_IN_A_PROCESS, str(source), str(root)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert len({out.strip() for out, _ in outputs}) == 1
    entries = [p for p in root.iterdir() if not p.name.endswith(".lock")]
    assert len(entries) == 1 and not list(root.glob("*.tmp-*"))
    durable.verify_dir(entries[0])


# ---------------------------------------------------------------- the bundled sample


def test_bundled_sample_loads() -> None:
    arrays, fingerprint, origin = data.load_source("sample", None)
    assert origin == "bundled sample mnist_sample.npz"
    assert {k: v.shape for k, v in arrays.items()} == {
        "x_train": (9000, 28, 28),
        "y_train": (9000,),
        "x_test": (2000, 28, 28),
        "y_test": (2000,),
    }
    assert arrays["x_train"].dtype == np.uint8
    data.check_arrays(arrays, origin)
    assert sorted(np.unique(arrays["y_train"]).tolist()) == list(range(10))
    assert fingerprint == expected_hash([data.SAMPLE_PATH])


# ---------------------------------------------------------------- bugs


def test_damaged_compressed_npz_raises_data_error(
    tmp_path: Path, arrays: dict[str, np.ndarray]
) -> None:
    path = tmp_path / "mnist.npz"
    small = {k: v[:8] for k, v in arrays.items()}
    np.savez_compressed(path, **small)  # Keras' mnist.npz is a compressed archive
    raw = path.read_bytes()
    escaped = set()
    for position in range(0, len(raw), 23):
        damaged = bytearray(raw)
        damaged[position] ^= 0xFF
        path.write_bytes(bytes(damaged))
        try:
            data.read_npz(path)
        except DataError:
            pass
        except Exception as exc:  # the point is which exceptions escape
            escaped.add(f"{type(exc).__module__}.{type(exc).__name__}")
    assert escaped == set()


def test_fractional_float_images_are_refused(arrays: dict[str, np.ndarray]) -> None:
    scaled = {**arrays, "x_train": arrays["x_train"] / 255.0, "x_test": arrays["x_test"] / 255.0}
    with pytest.raises(DataError):
        data.check_arrays(scaled, "src")


def test_bad_label_example_is_plain() -> None:
    images = np.zeros((2, 28, 28), dtype=np.uint8)
    labels = np.array([1, 10], dtype=np.uint8)
    with pytest.raises(DataError) as info:
        data.check_arrays(
            {"x_train": images, "y_train": labels, "x_test": images, "y_test": labels % 10}, "src"
        )
    assert str(info.value) == "src: y_train has labels outside 0–9 (e.g. [10])"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_fraction_leaving_no_training_images_is_refused(
    tmp_path: Path, arrays: dict[str, np.ndarray]
) -> None:
    # validate() allows any val_fraction < 1; round(10 * 0.95) = 10 takes the whole slice.
    source = write_npz(tmp_path / "mnist.npz", arrays)
    with pytest.raises(DataError):
        prepare(source, tmp_path / "data", train_size=10, val_fraction=0.95)
