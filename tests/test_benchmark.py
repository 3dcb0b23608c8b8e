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
    args += ["optimizer=adam_restarts"]  # restarts: a raised fit.epochs continues the run
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
        "fast": {
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
    pair["reference"]["epochs"][2]["seconds"] = 200.0
    assert bench.figure_time_to_99([pair]).met() == "yes"  # 0.1


def test_time_to_99_5_takes_the_quicker_recipe_against_the_reference_to_99() -> None:
    def rows(*points: tuple[float, float]) -> list[dict[str, float]]:
        return [
            {"epoch": i + 1, "train_seconds": t, "seconds": t, "test_accuracy": a}
            for i, (t, a) in enumerate(points)
        ]

    pair = {
        "pipeline": {"epochs": rows((10, 0.99), (20, 0.994), (30, 0.996))},
        "fast": {"epochs": rows((5, 0.991))},
        "reference": {"epochs": rows((10, 0.98), (40, 0.990), (50, 0.992))},
    }
    figure = bench.figure_time_to_99_5([pair])
    assert figure.values == [30 / 40] and figure.met() == "no"
    assert "pipeline experiment=fast never reached 99.5% in 1 epochs" in figure.notes[0]
    pair["fast"]["epochs"] = rows((5, 0.991), (15, 0.995))
    assert bench.figure_time_to_99_5([pair]).values == [15 / 40]


def test_default_wall_is_against_the_previous_default() -> None:
    pair = {
        "pipeline": {"wall_seconds": 180.0, "test_accuracy": 0.9965},
        "previous_default": {"wall_seconds": 240.0, "test_accuracy": 0.9945},
    }
    figure = bench.figure_default_wall([pair], bench.FULL)
    assert figure.values == [0.75] and figure.met() == "yes"
    assert "fit.fused_batch_norm=false" in figure.notes[0]
    assert "default 180 s (99.65%), previous default 240 s (99.45%)" in figure.notes[1]
    pair["pipeline"]["wall_seconds"] = 250.0
    assert bench.figure_default_wall([pair], bench.FULL).met() == "no"


def test_benchmark_previous_default_is_the_recipe_before_issue_14() -> None:
    # Figure 11 compares the default's wall time with this one; it must not follow the default.
    from conftest import composed

    cfg = composed([*bench.PREVIOUS_DEFAULT, f"fit.epochs={bench.PREVIOUS_DEFAULT_EPOCHS}"])
    assert (list(cfg.model.filters), cfg.model.convs_per_block) == ([16, 32, 64], 1)
    assert (cfg.model.dropout, cfg.model.batch_norm, cfg.fit.fused_batch_norm) == (
        0.25,
        True,
        False,
    )
    assert (cfg.optimizer.schedule, cfg.optimizer.cycle_epochs) == ("restarts", 3)
    assert (cfg.fit.epochs, cfg.fit.label_smoothing, cfg.checkpoint.every_steps) == (21, 0.0, 500)


def test_lost_work_is_judged_on_the_worst_kill() -> None:
    kills = [{"lost_seconds": s, "redone_steps": 10} for s in (0.5, 1.0, 4.0)]
    settings = bench.FULL
    figure = bench.figure_lost_work(kills, settings)
    assert figure.met() == "yes" and figure.row()[1] == "4.00 s"
    kills.append({"lost_seconds": 5.5, "redone_steps": 300})
    figure = bench.figure_lost_work(kills, settings)
    assert figure.met() == "no"  # the median (2.5 s) would pass: the worst kill decides
    assert "steps redone by the next session: at most 300" in figure.notes[0]


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
        "every_steps": 150,
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
        "--figures",  # 10 (lost work) has its own test below: a tiny run ends before a kill
        "1,2,3,4,5,6,7,8,9,11",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert not report["errors"]
    assert report["data"]["path"] == str(data)  # every side ran on the full MNIST file
    assert [f["number"] for f in report["figures"]] == [*range(1, 10), 11]
    for figure in report["figures"]:
        # Figures 3 and 7 count their own rounds of alternated blocks, not --pairs.
        own = {3: bench.QUICK.checkpoint_rounds, 7: bench.QUICK.input_rounds}
        rounds = own.get(figure["number"], 1)
        assert figure["pairs"] == rounds, figure
        assert figure["met"] in ("yes", "no", "unknown"), figure
    training = report["raw"]["training"][0]
    assert len(training["pipeline"]["epochs"]) == 2  # every epoch-end checkpoint scored
    assert training["pipeline"]["epochs"][-1]["test_accuracy"] == pytest.approx(
        training["pipeline"]["test_accuracy"]
    )
    # Figure 11's previous default trained the quick mode's 2 epochs too (its cost per epoch).
    assert len(training["previous_default"]["history"]) == 2


@pytest.mark.slow
def test_lost_work_kills_and_resumes_one_run(tmp_path: Path) -> None:
    """Figure 10's measurement, end to end on 2000 images: each kill lands, the run resumes
    (the next session's record gives the steps it redid), and the loss is bounded by the
    time since the session's first step."""
    from dataclasses import replace

    data = bench.DataChoice(str(shared_mnist()), 2000, 200)
    settings = replace(bench.QUICK, kills=2, kill_window=3.0)
    kills = bench.measure_lost_work(data, settings, tmp_path)
    assert len(kills) == 2 and {k["lap"] for k in kills} == {0}  # one run, killed twice
    for kill in kills:
        assert 0 <= kill["lost_seconds"] <= kill["after_first_step"] + 0.01, kill
    assert kills[0]["checkpoint_step"]  # 2.8 s in: past the first epoch end (16 steps)
    assert kills[0]["redone_steps"] is not None  # so the second session resumed from it
