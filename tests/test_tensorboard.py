"""What a run leaves for TensorBoard, read back with TensorBoard's own loaders: Keras' layout
(train/ and validation/ runs sharing their epoch_* tags), the confusion matrix and worst
mistakes as images, the test metrics, the HParams plugin's session info from fit's start (and
the plugin's own backend turning runs into one comparison table, with each run's state), the
model graph; and that evaluating again replaces rather than duplicates them."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import SMALL, cli, only_run_dir
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.graph_pb2 import GraphDef
from tensorboard.compat.proto.node_def_pb2 import NodeDef
from tensorboard.plugins.hparams import api_pb2
from tensorboard.plugins.hparams import metadata as hp_metadata

from pipeline import durable, evaluate, tblog, visuals
from pipeline.rundir import RunDir

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def accumulator(logdir: Path) -> ea.EventAccumulator:
    acc = ea.EventAccumulator(
        str(logdir), size_guidance={ea.IMAGES: 0, ea.TENSORS: 0, ea.SCALARS: 0}
    )
    acc.Reload()
    return acc


def start_info(acc: ea.EventAccumulator) -> object:
    content = acc.PluginTagToContent("hparams")[hp_metadata.SESSION_START_INFO_TAG]
    return hp_metadata.parse_session_start_info_plugin_data(content)


def hparams_dict(info: object) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, value in info.hparams.items():  # type: ignore[attr-defined]
        kind = value.WhichOneof("kind")
        out[name] = getattr(value, kind)
    return out


def copy_run(run_dir: Path, outputs: Path, name: str | None = None) -> Path:
    target = outputs / (name or run_dir.name)
    shutil.copytree(run_dir, target)
    return target


def raw(logdir: Path) -> list[Event]:
    return [
        Event.FromString(r)
        for path in tblog.event_files(logdir)
        for r in RawEventFileLoader(str(path)).Load()
    ]


def tagged(events: list[Event], tag: str) -> list[Event]:
    return [e for e in events if any(v.tag == tag for v in e.summary.value)]


def hparams_backend(outputs: Path) -> Any:
    """The HParams plugin's own backend over a directory of runs (as `tensorboard --logdir`)."""
    from tensorboard.backend.event_processing import data_provider
    from tensorboard.backend.event_processing import plugin_event_multiplexer as pem
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import backend_context

    mux = pem.EventMultiplexer()
    mux.AddRunsFromDirectory(str(outputs))
    mux.Reload()
    return backend_context.Context(
        base_plugin.TBContext(
            data_provider=data_provider.MultiplexerDataProvider(mux, str(outputs)),
            logdir=str(outputs),
        )
    )


@pytest.fixture(scope="module")
def reference(reference_run: tuple[Path, str]) -> tuple[Path, dict, ea.EventAccumulator]:
    run_dir = reference_run[0]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return run_dir, metrics, accumulator(run_dir / "tensorboard")


# ---------------------------------------------------------------- the reference run


def test_keras_layout_train_and_validation_share_their_tags(reference: tuple) -> None:
    """As Keras' TensorBoard callback writes them: train/ and validation/ runs with shared
    epoch_* tags (one chart, two curves), batch_* tags under train/, learning rate and steps/s
    by Keras' names; the values are the fit's own history."""
    run_dir = reference[0]
    found = tblog.scalars(run_dir / "tensorboard")
    history = durable.read_record(run_dir / "stages" / "fit.json")["history"]
    ends = [row["step"] for row in history]
    for run, loss, accuracy in (
        ("train", "loss", "accuracy"),
        ("validation", "val_loss", "val_accuracy"),
    ):
        assert found[f"{run}/epoch_loss"] == [(r["step"], pytest.approx(r[loss])) for r in history]
        assert found[f"{run}/epoch_accuracy"] == [
            (r["step"], pytest.approx(r[accuracy])) for r in history
        ]
    assert [s for s, _ in found["train/epoch_learning_rate"]] == ends
    assert [s for s, _ in found["train/epoch_steps_per_second"]] == ends
    every = 2  # SMALL's fit.log_every_steps
    for tag in ("batch_loss", "batch_accuracy", "batch_learning_rate"):
        assert [s for s, _ in found[f"train/{tag}"]] == list(range(every, ends[-1] + 1, every))
    # Nothing left in the old layout (tags with a slash at the top: epoch/..., train/loss).
    top = {k for k in found if not k.startswith(("train/", "validation/"))}
    assert top == {evaluate.TAG_ACCURACY, evaluate.TAG_LOSS}


def test_evaluate_images_at_the_evaluated_step(reference: tuple) -> None:
    run_dir, metrics, acc = reference
    assert sorted(acc.Tags()["images"]) == [evaluate.TAG_CONFUSION, evaluate.TAG_MISTAKES]
    for tag in (evaluate.TAG_CONFUSION, evaluate.TAG_MISTAKES):
        (image,) = acc.Images(tag)
        assert image.step == metrics["checkpoint_step"]
        png = image.encoded_image_string
        assert png.startswith(visuals.PNG_SIGNATURE)
        with Image.open(io.BytesIO(png)) as decoded:
            decoded.load()
            assert decoded.size == (image.width, image.height)
        assert image.width >= 400 and image.height >= 300


def test_evaluate_scalars_match_metrics_json(reference: tuple) -> None:
    _, metrics, acc = reference
    for tag, key in ((evaluate.TAG_ACCURACY, "test_accuracy"), (evaluate.TAG_LOSS, "test_loss")):
        (event,) = acc.Scalars(tag)
        assert event.step == metrics["checkpoint_step"]
        assert event.value == pytest.approx(metrics[key], rel=1e-6)


def test_hparams_session_carries_the_config(reference: tuple) -> None:
    run_dir, _, acc = reference
    info = start_info(acc)
    values = hparams_dict(info)
    assert info.group_name == run_dir.name  # type: ignore[attr-defined]
    config = durable.read_record(run_dir / "run.json")["config"]
    # The SMALL overrides of the reference run, with their TensorBoard types.
    assert values["data.train_size"] == 600 and values["data.test_size"] == 200
    assert values["fit.batch_size"] == 50 and values["fit.epochs"] == 3
    assert values["data.name"] == "sample" and values["model.name"] == "cnn"
    assert values["model.filters"] == json.dumps(config["model"]["filters"])
    assert values["model.batch_norm"] is config["model"]["batch_norm"]
    assert values["optimizer.learning_rate"] == pytest.approx(config["optimizer"]["learning_rate"])
    assert values["evaluate.checkpoint"] == "latest"
    assert not any(
        k.startswith(("run.", "checkpoint.", "export.")) or k == "data.path" for k in values
    )
    end = hp_metadata.parse_session_end_info_plugin_data(
        acc.PluginTagToContent("hparams")[hp_metadata.SESSION_END_INFO_TAG]
    )
    assert end.status == api_pb2.STATUS_SUCCESS


def test_model_graph(reference: tuple) -> None:
    acc = reference[2]
    graph = acc.Graph()
    ops = {node.op for node in graph.node}
    assert {"Conv2D", "MatMul", "Placeholder"} <= ops, ops


def test_hparams_plugin_lists_a_sweep_in_one_table(
    reference_run: tuple[Path, str], tmp_path: Path
) -> None:
    """The HParams plugin's own backend, over an outputs/ directory of two runs."""
    from tensorboard import context
    from tensorboard.plugins.hparams import get_experiment, list_session_groups

    outputs = tmp_path / "outputs"
    for name in ("first", "second"):
        copy_run(reference_run[0], outputs, name)
    # Make the second run differ in one hyperparameter, as a sweep would.
    tb = outputs / "second" / "tensorboard"
    tblog.drop_events(tb, lambda e: any(v.tag in evaluate.HPARAMS_TAGS for v in e.summary.value))
    log = tblog.EventLog(tb)
    values = evaluate.hparam_values(RunDir(outputs / "second"), "latest")
    log.hparams({**values, "fit.batch_size": 100}, group_name="second")
    log.close()

    ctx = hparams_backend(outputs)
    experiment = get_experiment.Handler(
        context.RequestContext(), ctx, "", api_pb2.GetExperimentRequest()
    ).run()
    infos = {h.name: h for h in experiment.hparam_infos}
    assert infos["fit.batch_size"].differs and not infos["model.name"].differs
    metrics = {(m.name.group, m.name.tag) for m in experiment.metric_infos}
    assert {("", evaluate.TAG_ACCURACY), ("", evaluate.TAG_LOSS)} <= metrics
    # Keras' layout: the same tag in the train and validation runs, one column each.
    assert {("train", "epoch_accuracy"), ("validation", "epoch_accuracy")} <= metrics
    request = api_pb2.ListSessionGroupsRequest(
        start_index=0, slice_size=10, allowed_statuses=[api_pb2.STATUS_SUCCESS]
    )
    groups = list_session_groups.Handler(context.RequestContext(), ctx, "", request).run()
    expected = json.loads((reference_run[0] / "metrics.json").read_text())["test_accuracy"]
    table = {}
    for group in groups.session_groups:
        accuracy = [m.value for m in group.metric_values if m.name.tag == evaluate.TAG_ACCURACY]
        table[group.name] = (group.hparams["fit.batch_size"].number_value, accuracy)
    # Evaluate named the session group after the run (the copy "first" keeps that name).
    assert table == {
        reference_run[0].name: (50, [pytest.approx(expected)]),
        "second": (100, [pytest.approx(expected)]),
    }


# ---------------------------------------------------------------- evaluating again


def test_evaluating_again_replaces_instead_of_duplicating(
    reference_run: tuple[Path, str], tmp_path: Path
) -> None:
    run_dir = copy_run(reference_run[0], tmp_path / "outputs")
    before = raw(run_dir / "tensorboard")
    latest = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    step = durable.verify_dir(latest)["loop"]["best_step"]
    # A different `evaluate.checkpoint` makes evaluate run again, on the best checkpoint.
    result = cli(["evaluate", *SMALL, "evaluate.checkpoint=best"], tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["checkpoint"] == "best" and metrics["checkpoint_step"] == step
    after = raw(run_dir / "tensorboard")
    for tag in (*evaluate.EVALUATE_TAGS, *evaluate.HPARAMS_TAGS):
        assert len(tagged(before, tag)) == 1, tag
    # One evaluation per evaluated checkpoint step (an earlier step's stays, as history); one
    # set of hparams for the run.
    for tag in evaluate.EVALUATE_TAGS:
        assert len([e for e in tagged(after, tag) if e.step == step]) == 1, tag
    for tag in evaluate.HPARAMS_TAGS:
        assert len(tagged(after, tag)) == 1, tag
    assert sum(bool(e.graph_def) for e in after) == 1
    # Training events are untouched.
    assert [e.step for e in tagged(after, "batch_loss")] == [
        e.step for e in tagged(before, "batch_loss")
    ]
    acc = accumulator(run_dir / "tensorboard")
    assert hparams_dict(start_info(acc))["evaluate.checkpoint"] == "best"
    assert step in [i.step for i in acc.Images(evaluate.TAG_CONFUSION)]
    # Back to the latest checkpoint: its evaluation is replaced, not duplicated.
    latest_step = durable.verify_dir(latest)["step"]
    assert cli(["evaluate", *SMALL], tmp_path).returncode == 0
    again = raw(run_dir / "tensorboard")
    for tag in evaluate.EVALUATE_TAGS:
        assert len([e for e in tagged(again, tag) if e.step == latest_step]) == 1, tag
    assert not [p for p in run_dir.rglob(f"*{durable.TMP_MARK}*")]


# ---------------------------------------------------------------- EventLog additions


def test_eventlog_image_hparams_graph_roundtrip(tmp_path: Path) -> None:
    png = visuals.confusion_matrix_png(np.diag([5] * 10))
    log = tblog.EventLog(tmp_path)
    log.image("evaluate/confusion_matrix", png, 7, *visuals.png_size(png))
    log.hparams(
        {"lr": 0.5, "name": "cnn", "bn": True, "units": 3}, group_name="g", start_time=123.0
    )
    graph = GraphDef(node=[NodeDef(name="x", op="Const")]).SerializeToString()
    log.graph(graph, 7)
    log.close()
    acc = accumulator(tmp_path)
    (image,) = acc.Images("evaluate/confusion_matrix")
    assert (image.step, image.encoded_image_string) == (7, png)
    assert (image.width, image.height) == visuals.png_size(png)
    info = start_info(acc)
    assert hparams_dict(info) == {"lr": 0.5, "name": "cnn", "bn": True, "units": 3}
    assert (info.group_name, info.start_time_secs) == ("g", 123.0)  # type: ignore[attr-defined]
    assert [n.name for n in acc.Graph().node] == ["x"]


def test_drop_events_keeps_everything_else(tmp_path: Path) -> None:
    log = tblog.EventLog(tmp_path)
    for step in (1, 2, 3):
        log.scalar("train/loss", step / 10, step)
        log.scalar("evaluate/test_accuracy", step / 100, step)
    log.close()
    dropped = tblog.drop_events(
        tmp_path,
        lambda e: e.step == 2 and any(v.tag == "evaluate/test_accuracy" for v in e.summary.value),
    )
    assert dropped == 1
    acc = accumulator(tmp_path)
    assert [e.step for e in acc.Scalars("evaluate/test_accuracy")] == [1, 3]
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]
    assert tblog.drop_events(tmp_path, lambda e: False) == 0
    assert len(list(tmp_path.iterdir())) == 1  # rewritten in place, no temp left


def test_one_event_reader_reads_like_tensorboard_and_checks_crcs(
    reference_run: tuple[Path, str], tmp_path: Path
) -> None:
    """tblog's TensorFlow-free reader (report and resume both use it) sees what TensorBoard's
    loader sees, stops cleanly at a torn last record, and at a record whose bytes were damaged
    (its CRC no longer matches) although its framing is intact."""
    for path in tblog.event_files(reference_run[0] / "tensorboard"):
        ours = tblog.events(path)
        theirs = [Event.FromString(r) for r in RawEventFileLoader(str(path)).Load()]
        assert ours == theirs and len(ours) > 1
    path = tblog.event_files(reference_run[0] / "tensorboard")[0]
    torn = tmp_path / path.name
    torn.write_bytes(path.read_bytes()[:-3])
    assert tblog.events(torn) == tblog.events(path)[:-1]
    good = tblog.records(path)
    damaged = bytearray(path.read_bytes())
    offset = 12 + len(good[0]) + 4 + 12  # the first data byte of the second record
    damaged[offset] ^= 0x01
    torn.write_bytes(bytes(damaged))
    assert tblog.records(torn) == good[:1]


def test_hparams_table_shows_running_and_failed_runs(
    reference_run: tuple[Path, str], tmp_path: Path
) -> None:
    """HParams are written when fit starts, so a sweep's table lists a run that is still
    training (here: killed mid-fit) as running, one whose fit failed (NaN) as failed, and a
    finished one as a success; read with the HParams plugin's own backend."""
    import signal

    from tensorboard import context
    from tensorboard.plugins.hparams import list_session_groups

    outputs = tmp_path / "outputs"
    copy_run(reference_run[0], outputs, "done")
    killed = cli(
        ["train", *SMALL, "model=mlp", "run.name=killed"],
        tmp_path,
        env={"PIPELINE_FAILPOINT": "dir_after_rename@3"},
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    failed = cli(
        ["train", *SMALL, "model=mlp", "optimizer.learning_rate=1e30", "run.name=failed"],
        tmp_path,
    )
    assert failed.returncode == 1 and "NaN or infinite" in failed.stderr

    ctx = hparams_backend(outputs)
    request = api_pb2.ListSessionGroupsRequest(
        start_index=0,
        slice_size=10,
        allowed_statuses=[
            api_pb2.STATUS_UNKNOWN,
            api_pb2.STATUS_RUNNING,
            api_pb2.STATUS_SUCCESS,
            api_pb2.STATUS_FAILURE,
        ],
    )
    groups = list_session_groups.Handler(context.RequestContext(), ctx, "", request).run()
    states = {g.name: [s.status for s in g.sessions] for g in groups.session_groups}
    assert states == {
        reference_run[0].name: [api_pb2.STATUS_SUCCESS],
        "killed": [api_pb2.STATUS_RUNNING],
        "failed": [api_pb2.STATUS_FAILURE],
    }


def test_profile_steps_write_a_profiler_trace(tmp_path: Path) -> None:
    """fit.profile_steps=[3,5]: TensorFlow's profiler traces those steps into the train/ run's
    plugins/profile/ (TensorBoard's Profile tab reads it); without the option, no trace."""
    args = ["train", *SMALL, "model=mlp", "fit.epochs=1"]
    result = cli([*args, "fit.profile_steps=[3,5]"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Profile of steps 3-5 written to" in result.stdout
    run_dir = only_run_dir(tmp_path / "outputs")
    traces = list((run_dir / "tensorboard" / "train" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    plain = cli([*args, "run.name=plain"], tmp_path)
    assert plain.returncode == 0, plain.stderr
    assert not list((tmp_path / "outputs" / "plain").rglob("*.xplane.pb"))
    bad = cli([*args, "fit.profile_steps=[5,3]", "run.name=bad"], tmp_path)
    assert bad.returncode == 2 and "fit.profile_steps" in bad.stderr
