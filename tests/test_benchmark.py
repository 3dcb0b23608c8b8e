"""scripts/benchmark.py: its bookkeeping (fast), one cheap figure end to end (fast), and every
figure on a tiny slice of MNIST (slow: about a minute on 2 cores)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import shared_mnist

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "benchmark.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmark"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


bench = load_benchmark()


def benchmark(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return result, json.loads(out.read_text()) if out.exists() else {}


def test_sides_alternate() -> None:
    orders = [order for _, order in bench.alternating(["a", "b"], 4)]
    assert orders == [["a", "b"], ["b", "a"], ["a", "b"], ["b", "a"]]


def test_resume_latency_reads_the_session_record(tmp_path: Path) -> None:
    """Figure 4 times launch -> the `first_step_at` of the run's session record (a record,
    not a log line's wording); a resumed session's record says where it resumed from."""
    from conftest import cli

    from pipeline.rundir import RunDir, run_dirs_under

    outputs = tmp_path / "outputs"
    args = ["data=sample", "data.train_size=300", "data.test_size=100", "model=mlp"]
    args += ["checkpoint.every_steps=2", "export.tflite=false", f"run.outputs={outputs}"]
    fresh = bench.launch_to_first_step(bench.pipeline_cmd("train", args), outputs, tmp_path / "a")
    assert 0 < fresh["seconds"] < 600
    (run_dir,) = run_dirs_under(outputs)
    session = RunDir(run_dir).read_session()
    assert session and "resumed_from" not in session and session["first_step"] == 1
    assert cli(["train", *args, "fit.epochs=1"], tmp_path).returncode == 0
    cmd = bench.pipeline_cmd("train", [*args, "fit.epochs=2"])
    resumed = bench.launch_to_first_step(cmd, outputs, tmp_path / "b")
    assert 0 < resumed["seconds"] < 600
    session = RunDir(run_dir).read_session()
    assert session and session["resumed_from"] == session["first_step"] - 1 >= 2
    assert session["redone_steps"] == 0 and session["state"] == "running"


def test_time_to_99_says_when_a_side_never_reaches_it() -> None:
    pair = {
        "pipeline": {
            "epochs": [
                {"epoch": 1, "train_seconds": 10.0, "test_accuracy": 0.985},
                {"epoch": 2, "train_seconds": 20.0, "test_accuracy": 0.991},
            ]
        },
        "reference": {
            "epochs": [
                {"epoch": 1, "seconds": 8.0, "test_accuracy": 0.98},
                {"epoch": 2, "seconds": 16.0, "test_accuracy": 0.989},
            ]
        },
    }
    figure = bench.figure_time_to_99([pair])
    assert figure.values == [] and figure.met() == "unknown"
    assert "reference never reached 99.0% in 2 epochs (best 98.90%)" in figure.notes[0]
    pair["reference"]["epochs"].append({"epoch": 3, "seconds": 40.0, "test_accuracy": 0.992})
    figure = bench.figure_time_to_99([pair])
    assert figure.values == [0.5] and figure.met() == "no"


def test_table_shows_median_range_pairs_goal() -> None:
    figure = bench.Figure(5, "config-error latency", [0.1, 0.3, 0.2], 3, "<=", 0.3)
    assert figure.row() == [
        "5 config-error latency",
        "0.200",
        "0.100-0.300",
        "3",
        "<= 0.300",
        "yes",
    ]
    lines = bench.table([figure]).splitlines()
    assert lines[0].split() == ["figure", "median", "min-max", "pairs", "goal", "met"]
    assert lines[2].split()[-5:] == ["0.100-0.300", "3", "<=", "0.300", "yes"]


def test_checkpoint_overhead_figure_is_the_ratio_of_paired_blocks() -> None:
    raw = {
        "every_steps": 500,
        "state_mb": 1.18,
        "checkpoint_rounds": [
            {"with_checkpoint_seconds": 26.2, "without_seconds": 26.0, "save_seconds": 0.01},
            {"with_checkpoint_seconds": 26.0, "without_seconds": 26.0, "save_seconds": 0.012},
        ],
    }
    figure = bench.figure_checkpoint_overhead(raw)
    assert figure.values == pytest.approx([26.2 / 26.0, 1.0])
    assert figure.pairs == 2 and figure.met() == "yes"
    assert "one checkpoint of 1.18 MB took 11.0 ms (median)" in figure.notes[0]


def test_config_error_figure_end_to_end(tmp_path: Path) -> None:
    result, report = benchmark(tmp_path, "--figures", "5", "--pairs", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 config-error latency (error / import tf)" in result.stdout
    assert [f["number"] for f in report["figures"]] == [5]
    pair = report["raw"]["config_error"][0]
    assert pair["config_error"]["seconds"] < pair["import_tensorflow"]["seconds"]


@pytest.mark.slow
def test_every_figure_on_tiny_data(tmp_path: Path) -> None:
    data = shared_mnist()
    result, report = benchmark(
        tmp_path,
        "--quick",
        "--pairs",
        "1",
        "--data",
        str(data),
        "--train-size",
        "600",
        "--test-size",
        "200",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert not report["errors"]
    assert report["data"]["path"] == str(data)  # every side ran on the full MNIST file
    assert [f["number"] for f in report["figures"]] == list(range(1, 9))
    for figure in report["figures"]:
        assert figure["pairs"] == 1, figure
        assert figure["met"] in ("yes", "no", "unknown"), figure
    training = report["raw"]["training"][0]
    assert len(training["pipeline"]["epochs"]) == 2  # every epoch-end checkpoint scored
    assert training["pipeline"]["epochs"][-1]["test_accuracy"] == pytest.approx(
        training["pipeline"]["test_accuracy"]
    )
