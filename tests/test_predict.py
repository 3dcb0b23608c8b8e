"""`python -m pipeline predict` on a real exported run: PNGs, .npy arrays, test-set indices, and
the one-line errors for bad inputs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import cli
from PIL import Image
from test_export import GOOD, good_run, held_out

LINE = re.compile(r"^(?P<input>.+): class (?P<class_id>\d) \(p=(?P<p>[01]\.\d{3})\)$")


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return good_run(tmp_path_factory)


@pytest.fixture(scope="module")
def digits(good: Path) -> dict[str, np.ndarray]:
    """For each class 0-9, the test image the model classifies right with the most confidence
    (by the SavedModel itself, loaded here), and its probabilities."""
    import tensorflow as tf

    x, y = held_out(good)
    serve = tf.saved_model.load(str(good / "export" / "mnist" / "1")).signatures["serving_default"]
    probabilities = serve(image=tf.constant(x))["probabilities"].numpy()
    right = np.argmax(probabilities, -1) == y
    index = np.array(
        [
            np.flatnonzero(y == c)[np.argmax(np.where(right[y == c], probabilities[y == c, c], -1))]
            for c in range(10)
        ]
    )
    assert right[index].all()
    return {"index": index, "x": x[index], "y": y[index], "probabilities": probabilities[index]}


def on(run_dir: Path) -> list[str]:
    """The overrides that select the good run from any working directory."""
    return [*GOOD, f"run.outputs={run_dir.parent}"]


def predicted(stdout: str) -> list[tuple[str, int, float]]:
    lines = stdout.strip().splitlines()
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    return [(m["input"], int(m["class_id"]), float(m["p"])) for m in matches if m]


def test_pngs_of_any_size_and_colour(
    tmp_path: Path, good: Path, digits: dict[str, np.ndarray]
) -> None:
    names = []
    for image, label in zip(digits["x"], digits["y"], strict=True):
        # As MNIST stores it: 28x28 grayscale, white digit on black.
        Image.fromarray(image).save(tmp_path / f"mnist-{label}.png")
        # As a scan might look: 100 rows x 80 columns, RGB, black digit on white paper.
        big = (
            Image.fromarray(255 - image).convert("RGB").resize((80, 100), Image.Resampling.BICUBIC)
        )
        big.save(tmp_path / f"paper-{label}.png")
        assert Image.open(tmp_path / f"paper-{label}.png").mode == "RGB"
        names += [f"mnist-{label}.png", f"paper-{label}.png"]
    # A drawing with a transparent background (black strokes, alpha = ink), and a noisy grey
    # "photo" with the digit off-centre in a 400x300 frame.
    first, second = digits["x"][3], digits["x"][4]
    drawing = np.zeros((28, 28, 4), np.uint8)
    drawing[..., 3] = first
    Image.fromarray(drawing, "RGBA").save(tmp_path / "drawing-3.png")
    rng = np.random.default_rng(0)
    photo = np.full((300, 400), 200.0) + rng.normal(0.0, 8.0, (300, 400))
    stroke = np.asarray(Image.fromarray(second).resize((150, 150), Image.Resampling.BICUBIC))
    photo[40:190, 220:370] -= stroke * (150.0 / 255.0)
    Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8)).save(tmp_path / "photo-4.png")
    names += ["drawing-3.png", "photo-4.png"]
    result = cli(["predict", *on(good), *names], tmp_path)
    assert result.returncode == 0, result.stderr
    got = predicted(result.stdout)
    assert [name for name, _, _ in got] == names
    expected = [int(name.split("-")[1][0]) for name in names]
    assert [class_id for _, class_id, _ in got] == expected
    assert all(0.1 < p <= 1.0 for _, _, p in got)


def test_npy_arrays_and_test_indices(
    tmp_path: Path, good: Path, digits: dict[str, np.ndarray]
) -> None:
    x, labels = digits["x"], digits["y"].tolist()
    np.save(tmp_path / "square.npy", x)  # N x 28 x 28 uint8
    np.save(tmp_path / "flat.npy", x.reshape(-1, 784).astype(np.float64))  # N x 784, 0-255
    indices = digits["index"].tolist()
    result = cli(
        [
            "predict",
            *on(good),
            "square.npy",
            "flat.npy",
            "--json",
            "out.json",
            "--test-index",
            ",".join(map(str, indices[:5])),
            *map(str, indices[5:]),
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    got = predicted(result.stdout)
    names = (
        [f"square.npy[{i}]" for i in range(10)]
        + [f"flat.npy[{i}]" for i in range(10)]
        + [f"test[{i}]" for i in indices]
    )
    assert [name for name, _, _ in got] == names
    assert [class_id for _, class_id, _ in got] == labels * 3
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["export"].endswith("export/mnist/1") and report["checkpoint_step"] == 108
    results = report["results"]
    assert [r["input"] for r in results] == names
    assert [r["label"] for r in results[20:]] == labels
    assert all("label" not in r for r in results[:20])
    probabilities = np.array([r["probabilities"] for r in results])
    for part in (probabilities[:10], probabilities[10:20], probabilities[20:]):
        assert np.allclose(part, digits["probabilities"], atol=1e-6)
    for (_, class_id, p), r in zip(got, results, strict=True):
        assert r["class_id"] == class_id and round(r["probability"], 3) == p


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory, good: Path) -> Path:
    tmp = tmp_path_factory.mktemp("bad_inputs")
    x = held_out(good)[0][:10]
    (tmp / "garbage.png").write_bytes(b"this is not a PNG file\n" * 10)
    Image.fromarray(x[0]).save(tmp / "whole.png")
    (tmp / "truncated.png").write_bytes((tmp / "whole.png").read_bytes()[:60])
    Image.new("RGB", (50, 40), (255, 255, 255)).save(tmp / "blank.png")
    np.save(tmp / "shape.npy", x[:, :27, :27])
    np.save(tmp / "scaled.npy", x.astype(np.float32) / 255.0)
    np.save(tmp / "negative.npy", x.astype(np.float32) - 10.0)
    np.save(tmp / "text.npy", np.full((1, 28, 28), "seven"))
    (tmp / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    return tmp


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.png"], "error: missing.png: no such file"),
        (["garbage.png"], "error: garbage.png: not a readable image"),
        (["truncated.png"], "error: truncated.png: not a readable image"),
        (["blank.png"], "error: blank.png: no digit found"),
        (
            ["shape.npy"],
            "error: shape.npy: array of shape (10, 27, 27); expected N x 28 x 28 or N x 784",
        ),
        (
            ["scaled.npy"],
            "error: scaled.npy: values from 0 to 1 look scaled to 0-1; multiply by 255",
        ),
        (["negative.npy"], "error: negative.npy: values from -10 to "),
        (["text.npy"], "error: text.npy: dtype <U5; expected uint8, or numbers 0-255"),
        (["broken.npy"], "error: broken.npy: not a readable .npy array"),
        (
            ["--test-index", "300"],
            "error: --test-index 300 is out of range: the run's test set has 300 images",
        ),
        (["--test-index", "two"], "'two' is not a test-set index"),
        (["--bogus"], "error: unrecognized arguments: --bogus"),
        ([], "error: nothing to predict"),
        (["run.name=nope", "whole.png"], "/nope. Train it with: python -m pipeline train"),
        (["model.kernel=3", "whole.png"], "error: model.kernel is not a config key"),
    ],
    ids=lambda value: value[0] if isinstance(value, list) and value else None,
)
def test_bad_input_is_one_line_and_exit_2(
    bad_inputs: Path, good: Path, args: list[str], message: str
) -> None:
    result = cli(["predict", *on(good), *args], bad_inputs, timeout=60)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert result.stdout == ""


def test_run_without_export(tmp_path: Path, good: Path) -> None:
    shutil.copytree(good, tmp_path / "outputs" / good.name, ignore=shutil.ignore_patterns("export"))
    result = cli(["predict", *GOOD, "--test-index", "0"], tmp_path, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: run outputs/{good.name} has no export in outputs/{good.name}/export/mnist. "
        f"Export it with: python -m pipeline export {' '.join(GOOD)}"
    )


def test_damaged_test_set_is_refused_and_left_in_place(tmp_path: Path, good: Path) -> None:
    """--test-index reads the run's data cache only once it verifies; predict is a reader, so
    the damaged cache stays where it is (the data stage sets it aside and rebuilds it)."""
    from pipeline.rundir import PREPARED, RunDir

    copy = RunDir(tmp_path / "outputs" / good.name)
    shutil.copytree(good, copy.root)
    shutil.copytree(good.parent / ".cache", copy.root.parent / ".cache")  # its shared data
    cache = copy.data / PREPARED
    raw = bytearray(cache.read_bytes())
    raw[len(raw) // 2] ^= 1
    cache.write_bytes(bytes(raw))
    result = cli(["predict", *GOOD, "--test-index", "0"], tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "sha256 mismatch" in lines[0], lines
    shared = copy.data.relative_to(tmp_path)
    assert lines[0].startswith(f"error: cannot read the run's test set in {shared}")
    assert cache.read_bytes() == bytes(raw) and not list(copy.data.parent.glob("*.corrupt*"))


def test_help_documents_the_inputs(tmp_path: Path) -> None:
    result = cli(["predict", "--help"], tmp_path, timeout=60)
    assert result.returncode == 0
    for text in ("--test-index", "--json", ".npy", "centre of mass", "20", "invert"):
        assert text in result.stdout, text
    # The export version has its own name: --version is the tool's (python -m pipeline --version).
    assert "--export-version N" in result.stdout and "--version N" not in result.stdout


def test_an_export_version_is_chosen_by_export_version(good: Path) -> None:
    run_args = ["predict", *on(good), "--test-index", "0", "--export-version"]
    assert cli([*run_args, "1"], good.parent.parent).returncode == 0
    missing = cli([*run_args, "7"], good.parent.parent)
    assert missing.returncode == 2 and "has no export version 7" in missing.stderr


def test_the_only_run_needs_no_overrides(good: Path, digits: dict[str, np.ndarray]) -> None:
    """Under an outputs folder holding one run, `predict --test-index` finds it unnamed."""
    i = int(digits["index"][3])
    result = cli(["predict", "--test-index", str(i)], good.parent.parent)
    assert result.returncode == 0, result.stderr
    assert f"the only run under outputs: {good.name}" in result.stderr
    assert predicted(result.stdout)[0][1] == 3
