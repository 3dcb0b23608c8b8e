"""The classic TensorFlow "save and load models" setup on real MNIST (slow: real data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cli, only_run_dir, shared_mnist

from pipeline import durable


@pytest.mark.slow
def test_tutorial_experiment_on_real_mnist(tmp_path: Path) -> None:
    data = shared_mnist()
    result = cli(["train", "experiment=tutorial", f"data.path={data}"], tmp_path, timeout=1200)
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path / "outputs")
    assert run_dir.name == "experiment=tutorial"
    assert durable.read_record(run_dir / "stages" / "data.json")["source"] == str(data)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test_images"] == 2000
    assert metrics["test_accuracy"] > 0.8  # the tutorial reports about 87% on 1000 images
    assert "Restored model, accuracy:" in result.stdout
    steps = sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))
    assert steps[-1] == 5 * 63  # 2000 images / batch 32 = 63 steps, 5 epochs
