"""Any checkpoint of a run as a Keras model, from a notebook or a script:

    from pipeline import load_model
    model = load_model("outputs/default", checkpoint="latest")   # or "best", or a step number
    probabilities = model.predict(x_test)                        # raw uint8 [N, 28, 28]

The checkpoint is verified (sha256 manifest) before use; the run directory is only read.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import durable, models
from pipeline.errors import PipelineError
from pipeline.rundir import RunDir

if TYPE_CHECKING:
    import keras


def load_model(run: str | Path | RunDir, checkpoint: str | int = "latest") -> keras.Model:
    """The model of run directory `run` at `checkpoint` ("latest", "best" or a step number):
    raw pixels (uint8 [N, 28, 28]) to probabilities."""
    from pipeline.evaluate import choose_checkpoint
    from pipeline.fit import restore_model

    run_dir = RunDir.of(run)
    try:
        stored = run_dir.read_run_record()["config"]["model"]
    except FileNotFoundError as exc:
        raise PipelineError(
            f"{run_dir.root} is not a run directory (no {run_dir.run_record.name})"
        ) from exc
    except (durable.CorruptArtifact, KeyError, TypeError) as exc:
        raise PipelineError(f"{run_dir.run_record} is damaged ({exc})") from exc
    cfg = models.config_class(stored["name"])(**stored)
    # Built with default pixel statistics: restoring the checkpoint brings the run's own.
    model = models.build_model(cfg)
    chosen = choose_checkpoint(run_dir.checkpoints, str(checkpoint), owner=False)
    restore_model(model, chosen.arrays)
    return models.with_probabilities(model)
