"""pipeline.visuals (numbers and pictures) and pipeline.report (report.html of a run, and the
predictions evaluate saves for it), checked on copies of the reference run."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import checkpoint, durable, evaluate, report, rundir, visuals
from pipeline.config import flatten
from pipeline.rundir import RunDir

IMG = re.compile(
    r'<img data-figure="([^"]+)" alt="[^"]*" width="(\d+)" '
    r'src="data:image/png;base64,([A-Za-z0-9+/=]+)">'
)
FILE_ROW = re.compile(
    r'<td class="path"><code>([^<]+)</code></td>.*?'
    r'<td class="sha"><code>([0-9a-f]{64})</code></td>'
)
CONFIG_ROW = re.compile(r'<code title="([^"]+)">[^<]+</code></td><td>([^<]+)')


# ---------------------------------------------------------------- visuals: numbers


def test_confusion_matrix_counts_true_by_predicted() -> None:
    counts = visuals.confusion_matrix(
        np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 0, 2]), classes=3
    )
    assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    with pytest.raises(ValueError):
        visuals.confusion_matrix(np.array([0, 1]), np.array([0]))


def test_per_class_metrics_and_undefined_ratios() -> None:
    counts = np.array([[3, 1, 0], [0, 0, 0], [1, 0, 0]])
    rows = visuals.per_class_metrics(counts)
    assert rows[0] == {
        "class": 0,
        "support": 4,
        "predicted": 4,
        "correct": 3,
        "precision": 0.75,
        "recall": 0.75,
        "f1": 0.75,
    }
    assert rows[1]["recall"] is None and rows[1]["precision"] == 0.0  # no true 1s
    assert rows[1]["f1"] is None
    assert rows[2]["precision"] is None and rows[2]["recall"] == 0.0  # never predicted


def test_worst_mistakes_most_confident_wrong_first() -> None:
    labels = np.array([0, 1, 2, 3])
    probs = np.array(
        [
            [0.9, 0.1, 0, 0],  # right
            [0.7, 0.3, 0, 0],  # wrong, 0.7
            [0.05, 0, 0, 0.95],  # wrong, 0.95
            [0, 0, 0.7, 0.3],
        ]
    )  # wrong, 0.7 (tie: lower index first)
    assert visuals.worst_mistakes(labels, probs, k=16).tolist() == [2, 1, 3]
    assert visuals.worst_mistakes(labels, probs, k=1).tolist() == [2]
    assert visuals.worst_mistakes(labels[:1], probs[:1]).tolist() == []
    assert visuals.caption(7, 2, 0.9812) == "true 7 / pred 2 (0.98)"


def test_softmax_rows_sum_to_one_without_overflow() -> None:
    p = visuals.softmax(np.array([[1000.0, 0.0], [0.0, 0.0]]))
    assert np.allclose(p.sum(axis=1), 1) and p[0, 0] == 1.0 and p[1, 0] == 0.5


# ---------------------------------------------------------------- visuals: pictures


def decode(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


def test_figures_are_valid_pngs_of_the_stated_size() -> None:
    rng = np.random.default_rng(0)
    history = [
        {
            "epoch": e,
            "step": 10 * e,
            "loss": 1 / e,
            "accuracy": 1 - 0.5 / e,
            "val_loss": 1.1 / e,
            "val_accuracy": 1 - 0.6 / e,
        }
        for e in (1, 2, 3)
    ]
    figures = [
        visuals.confusion_matrix_png(rng.integers(0, 50, (10, 10))),
        visuals.mistakes_grid_png(
            rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
            [1, 2, 3, 4, 5],
            rng.dirichlet(np.ones(10), 5),
        ),
        visuals.mistakes_grid_png(np.zeros((0, 28, 28), np.uint8), [], np.zeros((0, 10))),
        visuals.learning_curves_png(history, {"train/batch_loss": [(2, 2.0), (4, 1.5)]}, [14]),
        visuals.learning_curves_png([]),
    ]
    for png in figures:
        image = decode(png)
        assert image.format == "PNG" and image.mode == "RGB"
        assert image.size == visuals.png_size(png)
        assert min(image.size) >= 200
        assert len(np.unique(np.asarray(image))) > 2  # something was drawn
    with pytest.raises(ValueError):
        visuals.png_size(b"GIF89a" + bytes(30))


def test_figures_are_deterministic() -> None:
    counts = np.arange(100).reshape(10, 10)
    assert visuals.confusion_matrix_png(counts) == visuals.confusion_matrix_png(counts)
    assert visuals.confusion_matrix_png(counts) != visuals.confusion_matrix_png(counts + 1)


# ---------------------------------------------------------------- the report of a run


@pytest.fixture
def run_copy(reference_run: tuple[Path, str], tmp_path: Path) -> Path:
    target = tmp_path / "outputs" / reference_run[0].name
    shutil.copytree(reference_run[0], target)
    shared = rundir.data_cache(reference_run[0].parent)  # the prepared data it names
    shutil.copytree(shared, rundir.data_cache(target.parent))
    return target


def written(run_dir: Path) -> str:
    path = report.write_report(run_dir)
    assert path == run_dir / "report.html"
    assert not list(run_dir.glob(f".*{durable.TMP_MARK}*"))
    return path.read_text(encoding="utf-8")


def section(text: str, key: str) -> str:
    match = re.search(rf'<section id="{key}">(.*?)</section>', text, re.S)
    assert match, key
    return match.group(1)


def test_predictions_saved_by_evaluate_match_metrics(run_copy: Path) -> None:
    metrics = json.loads((run_copy / "metrics.json").read_text())
    with np.load(RunDir(run_copy).predictions) as npz:
        labels, probs = npz["labels"], npz["probabilities"]
        assert int(npz["checkpoint_step"]) == metrics["checkpoint_step"]
        worst, worst_images = npz["worst_index"], npz["worst_images"]
    with np.load(RunDir(run_copy).data / rundir.PREPARED) as data:
        assert np.array_equal(labels, data["y_test"])
        assert np.array_equal(worst_images, data["x_test"][worst])
    assert probs.shape == (metrics["test_images"], 10) and probs.dtype == np.float32
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    accuracy = float((probs.argmax(axis=1) == labels).mean())
    assert accuracy == pytest.approx(metrics["test_accuracy"])
    wrong = int((probs.argmax(axis=1) != labels).sum())
    assert len(worst) == min(evaluate.WORST, wrong)
    confidence = probs[worst, probs[worst].argmax(axis=1)]
    assert list(confidence) == sorted(confidence, reverse=True)


def test_report_sections_and_self_contained(run_copy: Path) -> None:
    text = written(run_copy)
    for key, title in report.SECTIONS:
        assert f"<h2>{title}</h2>" in section(text, key)
    assert text.startswith("<!doctype html>") and text.rstrip().endswith("</html>")
    assert "<style>" in text
    for external in ("http://", "https://", "<script", "<link", 'src="file:', "url("):
        assert external not in text, external
    figures = {m.group(1): m for m in IMG.finditer(text)}
    assert sorted(figures) == ["confusion_matrix", "learning_curves", "worst_mistakes"]
    assert text.count("<img ") == 3
    for tag, match in figures.items():
        png = base64.b64decode(match.group(3), validate=True)
        image = decode(png)
        assert image.format == "PNG", tag
        assert image.width == int(match.group(2)) == visuals.png_size(png)[0]


def test_report_config_values(run_copy: Path) -> None:
    text = section(written(run_copy), "config")
    shown = {key: html.unescape(value).strip() for key, value in CONFIG_ROW.findall(text)}
    config = flatten(durable.read_record(run_copy / "run.json")["config"])
    assert set(shown) == set(config)
    for key, value in config.items():
        assert shown[key] == json.dumps(value), key
    assert shown["data.train_size"] == "600" and shown["fit.batch_size"] == "50"


def test_report_escapes_text_from_the_run(run_copy: Path) -> None:
    """Text the run's records carry lands in the page escaped (the template's autoescaping):
    a session's failure message, a config value, a config key (in an attribute too)."""
    script = "<script>alert(1)</script>"
    value = '"><img src=x onerror=alert(1)>'
    key = '"><svg onload=alert(1)>'
    session = durable.read_record(run_copy / "session.json")
    durable.write_record(run_copy / "session.json", {**session, "message": script})
    record = durable.read_record(run_copy / "run.json")
    record["config"]["data"]["path"] = value
    record["config"]["model"][key] = 1
    durable.write_record(run_copy / "run.json", record)
    text = written(run_copy)
    assert "<script" not in text
    assert '<p class="note">&lt;script&gt;alert(1)&lt;/script&gt;</p>' in section(text, "summary")
    for raw in ("<img src=x", "onerror=alert(1)>", "<svg", "onload=alert(1)>"):
        assert raw not in text, raw
    assert text.count("<img ") == 3  # the three figures, nothing from the run
    config = section(text, "config")
    shown = {html.unescape(k): html.unescape(v).strip() for k, v in CONFIG_ROW.findall(config)}
    assert shown["data.path"] == json.dumps(value)
    assert shown[f"model.{key}"] == "1"


def test_report_evaluation_numbers(run_copy: Path) -> None:
    metrics = json.loads((run_copy / "metrics.json").read_text())
    text = written(run_copy)
    summary = section(text, "summary")
    assert f"{100 * metrics['test_accuracy']:.2f}%" in summary
    assert f"{metrics['test_loss']:.4f}" in summary
    evaluation = section(text, "evaluation")
    assert f"Checkpoint step {metrics['checkpoint_step']} (latest)" in evaluation
    assert f"{metrics['test_images']} test images" in evaluation
    match = re.search(r'<table class="per-class">(.*?)</table>', evaluation, re.S)
    assert match
    table = match.group(1)
    rows = re.findall(
        r"<tr><td class=\"num\">(\d)</td><td class=\"num\">(\d+)</td>"
        r"<td class=\"num\">(\d+)</td><td class=\"num\">(\d+)</td>",
        table,
    )
    assert [int(r[0]) for r in rows] == list(range(10))
    assert sum(int(r[1]) for r in rows) == metrics["test_images"]  # true counts
    assert sum(int(r[2]) for r in rows) == metrics["test_images"]  # predicted counts
    correct = sum(int(r[3]) for r in rows)
    assert correct / metrics["test_images"] == pytest.approx(metrics["test_accuracy"])
    history = section(text, "curves")
    assert len(re.findall(r"<tr><td class=\"num\">\d+</td>", history)) == 3  # 3 epochs


def test_report_checksums_match_the_files(run_copy: Path) -> None:
    text = section(written(run_copy), "inventory")
    listed = dict(FILE_ROW.findall(text))
    expected = {}
    committed = [
        RunDir(run_copy).data,
        *(
            checkpoint.path_for(run_copy / "checkpoints", s)
            for s in checkpoint.committed_steps(run_copy / "checkpoints")
        ),
        *(p for p in (run_copy / "export" / "mnist").iterdir() if p.name.isdigit()),
    ]
    assert len(committed) >= 3
    for directory in committed:
        for path in directory.rglob("*"):
            if path.is_file() and path.name != durable.MANIFEST:
                expected[os.path.relpath(path, run_copy)] = durable.sha256_file(path)
    assert listed == expected
    assert text.count('class="ok">verified<') == len(committed)
    assert "FAILED" not in text


def test_report_flags_a_damaged_checkpoint(run_copy: Path) -> None:
    steps = checkpoint.committed_steps(run_copy / "checkpoints")
    state = checkpoint.path_for(run_copy / "checkpoints", steps[0]) / "state.npz"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    text = section(written(run_copy), "inventory")
    assert text.count("FAILED verification") == 1
    assert re.search(
        rf"step-{steps[0]:09d}</code> <span class=\"bad\">FAILED verification: "
        r"[^<]*sha256 mismatch",
        text,
    )


def test_report_shows_resumes(run_copy: Path) -> None:
    """A resume recorded in the newest checkpoint's loop state shows up as a table row."""
    latest = checkpoint.path_for(
        run_copy / "checkpoints", checkpoint.committed_steps(run_copy / "checkpoints")[-1]
    )
    manifest = durable.read_record(latest / durable.MANIFEST)
    manifest["meta"]["loop"]["resumes"] = [{"step": 12, "epoch": 1, "time": 1_700_000_000.0}]
    durable.write_record(latest / durable.MANIFEST, manifest)
    durable.verify_dir(latest)
    text = written(run_copy)
    resumes = section(text, "resumes")
    assert "Resumed 1 time;" in resumes
    assert re.search(
        r'<td class="num">1</td><td class="num">12</td><td class="num">2</td>', resumes
    )
    assert "<b>1</b><span>resumes</span>" in section(text, "summary")


def test_report_of_a_run_not_evaluated_yet(run_copy: Path) -> None:
    RunDir(run_copy).predictions.unlink()
    (run_copy / "metrics.json").unlink()
    shutil.rmtree(run_copy / "export")
    (run_copy / "stages" / "evaluate.json").unlink()
    (run_copy / "stages" / "export.json").unlink()
    text = written(run_copy)
    assert "No predictions.npz yet" in section(text, "evaluation")
    assert sorted(m.group(1) for m in IMG.finditer(text)) == ["learning_curves"]
    assert "not done" in section(text, "timings")


def test_report_timings_list_every_stage(run_copy: Path) -> None:
    text = section(written(run_copy), "timings")
    for stage in ("data", "model", "fit", "evaluate", "export"):
        assert re.search(rf"<tr><td>{stage}</td><td class=\"nowrap\">\d{{4}}-\d\d-\d\d ", text)
    fit = durable.read_record(run_copy / "stages" / "fit.json")
    assert f"{fit['seconds_this_session']:.1f} s" in text
    assert "steps/s" in text  # the training session's throughput, from the event file


# ---------------------------------------------------------------- the command


def test_main_writes_the_report(run_copy: Path, capsys: pytest.CaptureFixture) -> None:
    outputs = run_copy.parent
    assert report.main([f"run.name={run_copy.name}", f"run.outputs={outputs}"]) == 0
    assert capsys.readouterr().out.strip() == f"Report: {run_copy / 'report.html'}"
    (run_copy / "report.html").unlink()
    assert report.main([f"run.outputs={outputs}"]) == 0  # every run under outputs
    assert (run_copy / "report.html").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["run.name=nope"], "error: no run at {outputs}/nope"),
        (["--json"], "error: report takes run.name=NAME and run.outputs=DIR, not --json"),
        (["fit.epochs=3"], "error: report takes run.name=NAME and run.outputs=DIR, not fit.epochs"),
    ],
)
def test_main_refuses_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], message: str
) -> None:
    outputs = tmp_path / "outputs"
    assert report.main([*args, f"run.outputs={outputs}"]) == 2
    captured = capsys.readouterr()
    assert captured.err == message.format(outputs=outputs) + "\n" and captured.out == ""


def test_main_without_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert report.main([f"run.outputs={tmp_path}"]) == 2
    assert capsys.readouterr().err.startswith("error: no runs yet. Start one with:")
