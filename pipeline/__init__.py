"""pipeline: MNIST training that never loses work."""

from __future__ import annotations

from typing import Any

__version__ = "0.3.0"


def load_model(run: Any, checkpoint: str | int = "latest") -> Any:
    """A verified Keras model (raw pixels to probabilities) from any checkpoint of a run; see
    pipeline/load.py. Imported lazily: `import pipeline` does not start TensorFlow."""
    from pipeline.load import load_model as load

    return load(run, checkpoint)
