"""Keras' "Simple MNIST convnet" (keras.io/examples/vision/mnist_convnet), in plain Keras.

The recipe is the example's: Conv2D(32, 3, relu) -> MaxPool(2) -> Conv2D(64, 3, relu) ->
MaxPool(2) -> Flatten -> Dropout(0.5) -> Dense(10, softmax); Adam (Keras defaults),
categorical crossentropy, batch 128, validation_split=0.1, 15 epochs. scripts/benchmark.py
compares the pipeline against it.

    python scripts/reference_convnet.py --data /path/to/mnist.npz --epochs 15 --seed 0

A callback scores the test set at each epoch end and records the wall time since the start of
`fit`, minus the time spent in these test evaluations. The last line printed is JSON:

    {"epochs": [{"epoch": 1, "seconds": 21.3, "test_accuracy": 0.978}, ...],
     "final_test_accuracy": 0.990, "fit_seconds": ..., "test_eval_seconds": ...}

`--test-eval end` scores the test set only after training, `--test-eval none` not at all (for
timing the whole process against a pipeline command that does not evaluate either).
"""

from __future__ import annotations

import argparse
import json
import time

import keras
import numpy as np
from keras import layers

NUM_CLASSES = 10
INPUT_SHAPE = (28, 28, 1)
BATCH_SIZE = 128
TEST_BATCH_SIZE = 1000


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        help="Keras-layout mnist.npz (default: "
        "keras.datasets.mnist.load_data(), i.e. Keras' cache or download)",
    )
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, help="use the first N training images")
    parser.add_argument("--test-size", type=int, help="use the first N test images")
    parser.add_argument(
        "--test-eval",
        choices=("epoch", "end", "none"),
        default="epoch",
        help="score the test set at every epoch end (default), at the end, or never",
    )
    parser.add_argument(
        "--stop-at",
        type=float,
        help="with --test-eval epoch: stop after the first epoch whose test accuracy reaches "
        "this (the training itself is unchanged; it only ends sooner)",
    )
    parser.add_argument("--verbose", type=int, default=2, help="Keras fit verbosity")
    return parser.parse_args()


def load_mnist(
    path: str | None,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    if path is None:
        return keras.datasets.mnist.load_data()
    with np.load(path, allow_pickle=False) as npz:
        return (npz["x_train"], npz["y_train"]), (npz["x_test"], npz["y_test"])


def prepare(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """As in the example: scale to [0, 1], add the channel axis, one-hot labels."""
    x = np.expand_dims(x.astype("float32") / 255, -1)
    return x, keras.utils.to_categorical(y, NUM_CLASSES)


def build_model() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input(shape=INPUT_SHAPE),
            layers.Conv2D(32, kernel_size=(3, 3), activation="relu"),
            layers.MaxPooling2D(pool_size=(2, 2)),
            layers.Conv2D(64, kernel_size=(3, 3), activation="relu"),
            layers.MaxPooling2D(pool_size=(2, 2)),
            layers.Flatten(),
            layers.Dropout(0.5),
            layers.Dense(NUM_CLASSES, activation="softmax"),
        ]
    )


def test_accuracy(model: keras.Model, x_test: np.ndarray, y_test: np.ndarray) -> float:
    probabilities = model.predict(x_test, batch_size=TEST_BATCH_SIZE, verbose=0)
    return float(np.mean(np.argmax(probabilities, -1) == np.argmax(y_test, -1)))


class EpochTimer(keras.callbacks.Callback):
    """Per epoch: the wall time since `fit_start` minus the time spent scoring the test set,
    and (if `x_test` is given) the test accuracy."""

    def __init__(
        self, x_test: np.ndarray | None, y_test: np.ndarray | None, stop_at: float | None = None
    ) -> None:
        super().__init__()
        self.x_test, self.y_test = x_test, y_test
        self.stop_at = stop_at
        self.fit_start = 0.0  # set right before model.fit
        self.test_eval_seconds = 0.0
        self.rows: list[dict[str, float]] = []

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        now = time.perf_counter()
        row = {"epoch": epoch + 1, "seconds": now - self.fit_start - self.test_eval_seconds}
        if self.x_test is not None:
            row["test_accuracy"] = test_accuracy(self.model, self.x_test, self.y_test)
            self.test_eval_seconds += time.perf_counter() - now
            if self.stop_at is not None and row["test_accuracy"] >= self.stop_at:
                self.model.stop_training = True
        self.rows.append(row)


def main() -> None:
    args = parse_args()
    keras.utils.set_random_seed(args.seed)
    (x_train, y_train), (x_test, y_test) = load_mnist(args.data)
    x_train, y_train = prepare(x_train[: args.train_size], y_train[: args.train_size])
    x_test, y_test = prepare(x_test[: args.test_size], y_test[: args.test_size])

    model = build_model()
    model.compile(loss="categorical_crossentropy", optimizer="adam", metrics=["accuracy"])
    score_each_epoch = args.test_eval == "epoch"
    timer = EpochTimer(
        x_test if score_each_epoch else None, y_test if score_each_epoch else None, args.stop_at
    )
    timer.fit_start = time.perf_counter()
    model.fit(
        x_train,
        y_train,
        batch_size=BATCH_SIZE,
        epochs=args.epochs,
        validation_split=0.1,
        callbacks=[timer],
        verbose=args.verbose,
    )
    fit_seconds = time.perf_counter() - timer.fit_start - timer.test_eval_seconds

    result = {
        "epochs": timer.rows,
        "fit_seconds": fit_seconds,
        "test_eval_seconds": timer.test_eval_seconds,
        "final_test_accuracy": None,
    }
    if score_each_epoch:
        result["final_test_accuracy"] = timer.rows[-1]["test_accuracy"]
    elif args.test_eval == "end":
        result["final_test_accuracy"] = test_accuracy(model, x_test, y_test)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
