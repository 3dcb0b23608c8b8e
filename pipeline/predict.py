"""`python -m pipeline predict`: classify images with the newest export of a run.

The run is chosen like for every other command (the same identity overrides, or run.name=...).
Inputs are read and checked before TensorFlow is imported, so a wrong file costs a fraction of a
second and one line (exit code 2). The model is the SavedModel of the newest export version that
verifies against its manifest, called through its `serving_default` signature (uint8 [N,28,28]
raw pixels), exactly as TensorFlow Serving would call it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from pipeline import durable
from pipeline.errors import PipelineError
from pipeline.rundir import RunDir, run_dirs_under

DESCRIPTION = """\
Classify digits with the newest exported model of a run.

usage:
  python -m pipeline predict [key=value ...] [FILE ...] [--test-index I [I ...]]
                             [--json OUT.json] [--export-version N]

The run is chosen like for the other commands: the same overrides that name it
(e.g. model=mlp seed=7) or run.name=NAME, and run.outputs=DIR. Its newest export version
(outputs/<run>/export/<export.model_name>/<N>/) whose MANIFEST.json verifies is loaded with
tf.saved_model.load and called through its serving_default signature.

inputs (any mix; one output line "<input>: class 7 (p=0.998)" per image):
  IMAGE.png      any size, grayscale or colour (any format Pillow reads), converted the
                 way MNIST was prepared:
                   1. transparent pixels are flattened onto white, then the image is
                      turned to grayscale (Pillow's "L": 0.299 R + 0.587 G + 0.114 B);
                   2. the background level is the median of the outermost pixel ring;
                      if it is light (> 127) the image is inverted, so the digit is
                      white on black as in MNIST;
                   3. the background level plus 3 times the border's noise (its robust
                      standard deviation, 1.4826 x median absolute deviation; 0 for a
                      clean image) is subtracted, negatives become 0, and the contrast is
                      stretched so the brightest pixel is 255;
                   4. the digit's bounding box (pixels >= 10% of the maximum) is cut out
                      and resized with Lanczos filtering so its longer side is 20 pixels,
                      keeping the aspect ratio;
                   5. it is pasted into a black 28x28 image so that its centre of mass
                      falls on pixel (14, 14) (rounded to whole pixels), as in MNIST;
                   6. values are rounded to uint8.
                 A blank image (no digit) is an error.
  ARRAY.npy      N x 28 x 28 or N x 784 (or one 28 x 28 / 784 image), uint8 or any
                 integer/float type holding raw pixels 0-255 (floats are rounded); white
                 digit on black, already MNIST-like: used as is. Lines read
                 "ARRAY.npy[i]: ...".
  --test-index   indices into the run's own test set (its prepared data, verified first:
                 outputs/.cache/data/<fingerprint>/): --test-index 0 1 2 or 0,1,2.
                 Lines read "test[i]: ...".

Arguments containing "=" whose part before "=" is a config key are overrides; put file names
after "--" if they contain "=" (python -m pipeline predict run.name=X -- a=b.png).

options:
  --json FILE         also write every result (class, probability, all 10 probabilities,
                      and the label for test-set images) to FILE as JSON
  --export-version N  use export version N instead of the newest (a tool's --version is
                      the package's: python -m pipeline --version)
  -h, --help          this help

exit codes: 0 done; 2 a usage mistake (unknown run, run without export, missing or unreadable
file, wrong array shape or values); 1 the export failed verification or could not be loaded.

examples:
  python -m pipeline predict digit.png photo.png
  python -m pipeline predict model=mlp seed=7 batch.npy --json predictions.json
  python -m pipeline predict run.name=default --test-index 0 1 2
"""
OVERRIDE = re.compile(r"^[~+]{0,2}[A-Za-z_][A-Za-z0-9_.@-]*=")
NOISE_SIGMAS = 3.0  # darker than background + 3 noise std (of the border) counts as background
INK_FRACTION = 0.1  # bounding box: pixels at least this fraction of the brightest one
BOX = 20  # MNIST: the digit fits a 20x20 box ...
SIZE = 28  # ... centred by centre of mass in 28x28
CENTRE = 14.0  # where MNIST's centres of mass lie (mean over its test set: 13.99, 14.01)
CHUNK = 1024


class UsageError(PipelineError):
    exit_code = 2


@dataclass
class Inputs:
    names: list[str] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)  # uint8 28x28 each
    labels: list[int | None] = field(default_factory=list)

    def add(self, name: str, image: np.ndarray, label: int | None = None) -> None:
        self.names.append(name)
        self.images.append(image)
        self.labels.append(label)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}. See: python -m pipeline predict --help")


def _indices(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a test-set index (use --test-index 0 1 2 or 0,1,2, after the files)"
        ) from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: indices are integers >= 0")
    return values


def parse_args(args: list[str]) -> tuple[list[str], argparse.Namespace]:
    """Split off Hydra-style overrides; the rest is predict's own arguments."""
    forced: list[str] = []
    if "--" in args:
        cut = args.index("--")
        args, forced = args[:cut], args[cut + 1 :]
    overrides = [a for a in args if OVERRIDE.match(a) and not Path(a).is_file()]
    rest = [a for a in args if a not in overrides]
    parser = _Parser(prog="python -m pipeline predict", add_help=False)
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("files", nargs="*")
    parser.add_argument(
        "--test-index", dest="test_index", nargs="+", type=_indices, action="extend", default=[]
    )
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--export-version", type=int)
    opts = parser.parse_intermixed_args(rest)
    opts.files = [*opts.files, *forced]
    opts.test_index = [i for group in opts.test_index for i in group]
    return overrides, opts


# ---------------------------------------------------------------- reading inputs


def mnist_like(gray: np.ndarray, name: str) -> np.ndarray:
    """A grayscale image (float, 0-255, any size) -> uint8 28x28 the way MNIST was prepared."""
    from PIL import Image

    gray = gray.astype(np.float32)
    ring = np.concatenate([gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1]])
    if np.median(ring) > 127:
        gray = 255.0 - gray
        ring = 255.0 - ring
    background = float(np.median(ring))
    noise = 1.4826 * float(np.median(np.abs(ring - background)))  # robust std of the border
    ink = np.clip(gray - (background + NOISE_SIGMAS * noise), 0.0, None)
    peak = float(ink.max())
    if peak < 1.0:
        raise UsageError(f"{name}: no digit found (the image is one flat colour)")
    ink *= 255.0 / peak
    rows = np.flatnonzero((ink >= INK_FRACTION * 255.0).any(axis=1))
    cols = np.flatnonzero((ink >= INK_FRACTION * 255.0).any(axis=0))
    crop = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    height, width = crop.shape
    scale = BOX / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    patch = Image.fromarray(np.ascontiguousarray(crop, np.float32)).resize(
        size, Image.Resampling.LANCZOS
    )
    digit = np.clip(np.asarray(patch, dtype=np.float32), 0.0, 255.0)
    height, width = digit.shape
    mass = float(digit.sum())
    if mass <= 0.0:
        raise UsageError(f"{name}: no digit found after resizing")
    ys, xs = np.indices(digit.shape)
    top = min(max(round(CENTRE - float((ys * digit).sum()) / mass), 0), SIZE - height)
    left = min(max(round(CENTRE - float((xs * digit).sum()) / mass), 0), SIZE - width)
    out = np.zeros((SIZE, SIZE), np.float32)
    out[top : top + height, left : left + width] = digit
    return np.rint(out).astype(np.uint8)


def read_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as opened:
            opened.load()
            image: Image.Image = opened
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                flat = Image.new("RGBA", image.size, (255, 255, 255, 255))
                image = Image.alpha_composite(flat, image.convert("RGBA"))
            gray = np.asarray(image.convert("L"), dtype=np.float32)
    except Exception as exc:  # Pillow's decoders raise OSError, SyntaxError, ValueError, ...
        raise UsageError(f"{path}: not a readable image ({exc})") from exc
    if min(gray.shape) < 2:
        raise UsageError(f"{path}: image of {gray.shape[1]}x{gray.shape[0]} pixels is too small")
    return mnist_like(gray, str(path))


def read_array(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy raises ValueError, OSError, EOFError, ...
        raise UsageError(f"{path}: not a readable .npy array ({exc})") from exc
    if not isinstance(array, np.ndarray):
        raise UsageError(f"{path}: holds several arrays; save one array with np.save")
    if array.shape in ((28, 28), (784,)):
        array = array[None]
    if array.ndim not in (2, 3) or array.shape[1:] not in ((28, 28), (784,)) or not len(array):
        raise UsageError(
            f"{path}: array of shape {array.shape}; expected N x 28 x 28 or N x 784 raw pixels"
        )
    if array.dtype == np.uint8:
        return array.reshape(-1, 28, 28)
    if array.dtype.kind not in "iuf":
        raise UsageError(f"{path}: dtype {array.dtype}; expected uint8, or numbers 0-255")
    values = array.astype(np.float64)
    if not np.isfinite(values).all():
        raise UsageError(f"{path}: holds NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > 255:
        raise UsageError(f"{path}: values from {low:g} to {high:g}; expected raw pixels 0-255")
    if array.dtype.kind == "f" and 0 < high <= 1.0:
        raise UsageError(
            f"{path}: values from {low:g} to {high:g} look scaled to 0-1; "
            "multiply by 255 (the model takes raw pixels 0-255)"
        )
    return np.rint(values).astype(np.uint8).reshape(-1, 28, 28)


def read_inputs(files: list[str], test_index: list[int], run_dir: RunDir | Path) -> Inputs:
    inputs = Inputs()
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise UsageError(f"{name}: no such file")
        if path.suffix.lower() == ".npy":
            for i, image in enumerate(read_array(path)):
                inputs.add(f"{name}[{i}]", image)
        else:
            inputs.add(name, read_image(path))
    if test_index:
        run = RunDir.of(run_dir)
        try:
            test = run.prepared_data("x_test", "y_test")
        except (
            OSError,
            KeyError,
            ValueError,
            zipfile.BadZipFile,
            durable.CorruptArtifact,
        ) as exc:  # the data stage sets a damaged cache aside and prepares it again
            raise UsageError(
                f"cannot read the run's test set in {run.data} ({exc}); prepare it "
                "with: python -m pipeline data <the run's overrides>"
            ) from exc
        x_test, y_test = test["x_test"], test["y_test"]
        for i in test_index:
            if i >= len(x_test):
                raise UsageError(
                    f"--test-index {i} is out of range: the run's test set has "
                    f"{len(x_test)} images (0..{len(x_test) - 1})"
                )
            inputs.add(f"test[{i}]", x_test[i], int(y_test[i]))
    if not inputs.names:
        raise UsageError(
            "nothing to predict: give image files, .npy arrays or --test-index. "
            "See: python -m pipeline predict --help"
        )
    return inputs


# ---------------------------------------------------------------- the run and its export


def choose_run(overrides: list[str]) -> tuple[Path, str]:
    """The run directory and export model name these overrides select (no TensorFlow)."""
    from hydra import compose

    from pipeline.configcheck import compose_and_check, initialize

    run_dir = compose_and_check(overrides)
    with initialize():
        model_name = str(compose("config", overrides=overrides).export.model_name)
    if not overrides or all(o.startswith("run.outputs=") for o in overrides):
        # No override names a run: with a single run under outputs, that is the one meant.
        runs = run_dirs_under(run_dir.parent)
        if not RunDir(run_dir).run_record.exists() and len(runs) == 1:
            print(f"(the only run under {run_dir.parent}: {runs[0].name})", file=sys.stderr)
            run_dir = runs[0]
            config = RunDir(run_dir).read_run_record().get("config", {})
            model_name = str(config.get("export", {}).get("model_name", model_name))
    if not RunDir(run_dir).run_record.exists():
        raise UsageError(
            f"no run at {run_dir}. Train it with: python -m pipeline train "
            f"{' '.join(overrides)}".rstrip()
        )
    return run_dir, model_name


def choose_export(
    run_dir: RunDir | Path, model_name: str, overrides: list[str], version: int | None
) -> tuple[Path, dict[str, Any]]:
    """The newest (or the asked-for) export version that verifies, and its manifest meta."""
    run = RunDir.of(run_dir)
    run_dir, root = run.root, run.export_root(model_name)
    found = sorted(run.export_versions(model_name), reverse=True)
    if not found:
        raise UsageError(
            f"run {run_dir} has no export in {root}. Export it with: python -m "
            f"pipeline export {' '.join(overrides)}".rstrip()
        )
    if version is not None:
        if version not in found:
            raise UsageError(
                f"run {run_dir} has no export version {version} (it has "
                f"{', '.join(map(str, sorted(found)))})"
            )
        found = [version]
    problems = []
    for number in found:
        path = run.export_version(model_name, number)
        try:
            return path, durable.verify_dir(path)
        except durable.CorruptArtifact as exc:
            problems.append(str(exc))
            print(
                f"warning: export {path} failed verification ({exc}); skipped",
                file=sys.stderr,
                flush=True,
            )
    raise PipelineError(
        f"no export of {run_dir} verifies ({problems[0]}). Export it again "
        f"with: python -m pipeline export {' '.join(overrides)}".rstrip()
    )


def classify(export: Path, images: np.ndarray) -> np.ndarray:
    """Probabilities [N,10] from the SavedModel's serving_default signature."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from pipeline import tfstart

    tfstart.start()
    import tensorflow as tf

    try:
        serve = tf.saved_model.load(str(export)).signatures["serving_default"]
    except (OSError, KeyError, ValueError, tf.errors.OpError) as exc:
        raise PipelineError(f"cannot load the SavedModel {export} ({exc})") from exc
    parts = [
        serve(image=tf.constant(images[i : i + CHUNK]))["probabilities"].numpy()
        for i in range(0, len(images), CHUNK)
    ]
    return np.concatenate(parts)


def write_json(
    path: Path, export: Path, meta: dict[str, Any], inputs: Inputs, probabilities: np.ndarray
) -> None:
    results = []
    for name, label, probs in zip(inputs.names, inputs.labels, probabilities, strict=True):
        result: dict[str, Any] = {
            "input": name,
            "class_id": int(np.argmax(probs)),
            "probability": float(np.max(probs)),
            "probabilities": [float(p) for p in probs],
        }
        if label is not None:
            result["label"] = label
        results.append(result)
    body = {
        "export": str(export),
        "checkpoint_step": meta.get("checkpoint_step"),
        "results": results,
    }
    try:
        durable.write_bytes(path, (json.dumps(body, indent=2) + "\n").encode())
    except (OSError, PipelineError) as exc:
        raise UsageError(f"cannot write {path} ({exc})") from exc


def run(args: list[str]) -> int:
    overrides, opts = parse_args(args)
    if opts.help:
        print(DESCRIPTION)
        return 0
    json_path = Path(opts.json_path) if opts.json_path else None
    if json_path is not None and not json_path.absolute().parent.is_dir():
        raise UsageError(f"--json {json_path}: directory {json_path.parent} does not exist")
    run_dir, model_name = choose_run(overrides)
    export, meta = choose_export(run_dir, model_name, overrides, opts.export_version)
    inputs = read_inputs(opts.files, opts.test_index, run_dir)
    print(
        f"predict: {export} (checkpoint step {meta.get('checkpoint_step')})",
        file=sys.stderr,
        flush=True,
    )
    probabilities = classify(export, np.stack(inputs.images))
    for name, probs in zip(inputs.names, probabilities, strict=True):
        print(f"{name}: class {int(np.argmax(probs))} (p={float(np.max(probs)):.3f})")
    if json_path is not None:
        write_json(json_path, export, meta, inputs, probabilities)
    return 0


def main(args: list[str]) -> int:
    try:
        return run(args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130
    except BrokenPipeError:  # `predict ... | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
