"""`python -m pipeline tune`: a search space in Hydra's syntax, proposals that do not depend on
restarts, `status --study`, and a search killed mid-trial twice that ends bit-identical to an
uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import conftest
import pytest
from conftest import assert_same_state, final_state

from pipeline import durable, rundir, status, tune
from pipeline.errors import ConfigError

optuna = pytest.importorskip("optuna")  # the [tune] extra, which [test] includes

TINY = [*conftest.TINY, "model=mlp"]  # the MLP: a trial is a few seconds
SPACE = [
    "optimizer.learning_rate=tag(log, interval(1e-3, 1e-1))",
    "model.dropout=interval(0, 0.5)",
]
# `python -m pipeline tune` once __main__ dispatches it; pipeline.tune.main meanwhile.
TUNE = [sys.executable, "-m", "pipeline", "tune"]


def parsed(args: list[str]) -> tuple[tune.Options, list[tune.Param]]:
    opts = tune.parse_args(args)
    return opts, tune.parse_space(opts.space, tune.compose(opts.fixed))


def test_the_search_space_is_written_in_hydras_override_syntax() -> None:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    opts, space = parsed(
        [
            "--trials=3",
            "--seed",
            "7",
            "--prune",
            "optimizer.learning_rate=tag(log, interval(1e-4, 1e-1))",
            "model.dropout=interval(0, 0.5)",
            "model.hidden_units=interval(16, 128)",  # an int key: an int
            "fit.batch_size=choice(32, 64)",
            "optimizer.name=adam,sgd",
            "seed=range(0, 10, 3)",
            *TINY,
        ]
    )
    assert (opts.trials, opts.seed, opts.prune, opts.study) == (3, 7, True, None)
    assert opts.fixed == TINY
    dists = {p.key: p.distribution for p in space}
    assert dists == {
        "optimizer.learning_rate": FloatDistribution(1e-4, 1e-1, log=True),
        "model.dropout": FloatDistribution(0.0, 0.5),
        "model.hidden_units": IntDistribution(16, 128),
        "fit.batch_size": CategoricalDistribution([32, 64]),
        "optimizer.name": CategoricalDistribution(["adam", "sgd"]),
        "seed": IntDistribution(0, 9, step=3),
    }
    params = {"optimizer.learning_rate": 0.1 / 3, "model.dropout": 0.0, "fit.batch_size": 32}
    overrides = tune.trial_overrides(["model=mlp"], params, space[:1] + space[1:2] + space[3:4])
    assert overrides == [
        "model=mlp",
        f"optimizer.learning_rate={0.1 / 3!r}",
        "model.dropout=0.0",
        "fit.batch_size=32",
    ]
    # The default study name is made of the space, the fixed overrides, the seed and --prune.
    same = tune.parse_args([*reversed(opts.space), *opts.fixed, "--seed=7", "--prune"])
    assert tune.default_study_name(same) == tune.default_study_name(opts)
    other = tune.parse_args([*opts.space, *opts.fixed, "--seed=8", "--prune"])
    assert tune.default_study_name(other) != tune.default_study_name(opts)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["model=mlp"], "no search space"),
        ([*SPACE, "run.name=mine"], "leave run.name out"),
        ([*SPACE, "fit.epochs=choice(1, 2)"], "cannot be searched"),
        (["model=interval(0, 1)"], "config group"),
        (["model.hidden_units=interval(1.5, 8)", "model=mlp"], "whole-number ends"),
        (["optimizer.learning_rate=tag(log, interval(0, 1))"], "low > 0"),
        (["model.nope=interval(0, 1)", "model=mlp"], "model.nope"),
        ([*SPACE, "--trials", "0"], "at least 1"),
        ([*SPACE, "--study", "../x"], "a study name is"),
        ([*SPACE, "--bogus"], "not '--bogus'"),
    ],
)
def test_a_wrong_search_fails_at_once_in_one_line(
    args: list[str],
    says: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    assert tune.main(args) == ConfigError.exit_code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and err.count("\n") == 1, err
    assert not (tmp_path / "outputs").exists()  # nothing is made


def _search(storage: str, seed: int, trials: int, reload: bool) -> list[dict]:
    """Propose, run (a made-up objective) and tell, the way Search does; `reload`: a new Study
    object (a restarted search) for every trial."""
    _, space = parsed(["fit.batch_size=choice(32, 64, 128)", *SPACE, "model=mlp"])
    study = None
    for _ in range(trials):
        if study is None or reload:
            study = optuna.load_study(study_name="s", storage=storage)
        study.enqueue_trial(tune.propose(study, space, seed, startup=3))
        trial = study.ask({p.key: p.distribution for p in space})
        p = trial.params
        study.tell(trial, p["model.dropout"] - abs(p["optimizer.learning_rate"] - 0.01))
    assert study is not None
    return [t.params for t in study.trials]


def test_proposals_depend_on_the_seed_and_the_history_not_on_restarts(tmp_path: Path) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    found = []
    for name, seed, reload in (("a", 0, False), ("b", 0, True), ("c", 1, False)):
        storage = f"sqlite:///{tmp_path / name}.db"
        optuna.create_study(study_name="s", storage=storage, direction="maximize")
        found.append(_search(storage, seed, 7, reload))  # 3 random, then 4 of TPE
    assert found[0] == found[1]
    assert found[0] != found[2]
    assert len({json.dumps(p, sort_keys=True) for p in found[0]}) == 7


def test_a_study_is_continued_only_by_the_same_search(tmp_path: Path) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    outputs = tmp_path / "outputs"
    opts, space = parsed(["--study", "s", *SPACE, "model=mlp", "fit.epochs=2"])
    tune.Search(opts, space, outputs, "s").check_identity()
    # The same search typed in another order, with more trials: the same study.
    again, space = parsed(["fit.epochs=2", "--trials=50", "model=mlp", *reversed(SPACE)])
    tune.Search(again, space, outputs, "s").check_identity()
    other, space = parsed(["--seed=1", *SPACE, "model=mlp", "fit.epochs=2"])
    with pytest.raises(ConfigError, match="made with another seed"):
        tune.Search(other, space, outputs, "s").check_identity()


def test_a_trial_that_validation_refuses_fails_and_the_search_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    monkeypatch.chdir(tmp_path)
    bad = "fit.batch_size=choice(50, -1)"  # its first point is valid: the search starts
    _, space = parsed([bad, "model=mlp"])
    seed = next(
        s
        for s in range(50)
        if tune.propose(optuna.create_study(direction="maximize"), space, s)["fit.batch_size"] == -1
    )
    assert tune.main(["--trials=1", f"--seed={seed}", "--study=bad", bad, "model=mlp"]) == 0
    assert "trial 0: failed: fit.batch_size=-1 is not allowed" in capsys.readouterr().out
    (trial,) = summary_of(tmp_path / "outputs", "bad")["trials"]
    assert trial["state"] == "FAIL" and "fit.batch_size=-1" in trial["message"]
    assert not rundir.run_dirs_under(tmp_path / "outputs")  # no run was started


def _fake_run(outputs: Path, name: str) -> None:
    run = rundir.RunDir(outputs / name)
    rundir.check_identity(run, {"name": name}, {})


def test_status_shows_the_study_of_each_run_and_its_trials_best_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    outputs = tmp_path / "outputs"
    opts, space = parsed(["--study", "lr", *SPACE, "model=mlp"])
    search = tune.Search(opts, space, outputs, "lr")
    outcomes = [(TrialState.COMPLETE, 0.5), (TrialState.FAIL, None), (TrialState.COMPLETE, 0.9)]
    for number, (state, value) in enumerate(outcomes):
        search.study.enqueue_trial(tune.propose(search.study, space, 0))
        trial = search.study.ask({p.key: p.distribution for p in space})
        trial.set_user_attr("run", f"run{number}")
        _fake_run(outputs, f"run{number}")
        search.tell(trial.number, state, value)
    search.study.enqueue_trial(tune.propose(search.study, space, 0))
    search.study.ask({p.key: p.distribution for p in space})  # running
    search.write_summary()
    _fake_run(outputs, "other")  # not made by a search

    assert status.main(["--study", "lr", f"run.outputs={outputs}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("study lr: 3 of 20 trials finished")
    assert [line.split()[:2] for line in lines[2:]] == [
        ["2", "COMPLETE"],
        ["0", "COMPLETE"],
        ["3", "RUNNING"],
        ["1", "FAIL"],
    ]
    assert "90.00%" in lines[2] and "optimizer.learning_rate=" in lines[2]
    assert status.main(["--study=lr", "--json", f"run.outputs={outputs}"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [t["number"] for t in summary["trials"]] == [2, 0, 3, 1]
    assert summary["trials"][0]["value"] == 0.9

    assert status.main(["--json", f"run.outputs={outputs}"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {n: (r["study"], r["trial"]) for n, r in rows.items()} == {
        "run0": ("lr", 0),
        "run1": ("lr", 1),
        "run2": ("lr", 2),
        "other": (None, None),
    }
    assert status.main([f"run.outputs={outputs}"]) == 0
    table = capsys.readouterr().out
    assert "STUDY" in table and "lr#2" in table

    assert status.main(["--study", "nope", f"run.outputs={outputs}"]) == 2
    assert "no study 'nope'" in capsys.readouterr().err


def test_pruning_decides_on_each_epochs_value_in_order(tmp_path: Path) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    opts, space = parsed(["--prune", "--study", "p", *SPACE, "model=mlp"])
    search = tune.Search(opts, space, tmp_path / "outputs", "p")

    def new_trial() -> optuna.Trial:
        search.study.enqueue_trial(tune.propose(search.study, space, 0))
        return search.study.ask({p.key: p.distribution for p in space})

    for _ in range(5):  # MedianPruner decides after 5 finished trials
        trial = new_trial()
        assert not search.pruned(trial, [{"epoch": 1, "val_accuracy": 0.5}])
        assert not search.pruned(trial, [{"epoch": 1}, {"epoch": 2, "val_accuracy": 0.6}])
        search.study.tell(trial, 0.6)
    trial = new_trial()
    assert not search.pruned(trial, [])  # nothing reported: nothing to decide
    # Optuna's MedianPruner: the trial's best so far against the others' median at the epoch.
    assert not search.pruned(trial, [{"epoch": 1, "val_accuracy": 0.55}])
    history = [{"epoch": 1, "val_accuracy": 0.55}, {"epoch": 2, "val_accuracy": 0.58}]
    assert search.pruned(trial, history)
    # A restarted search asks again about the last epoch reported (killed in between).
    again = tune.Search(opts, space, tmp_path / "outputs", "p")
    assert again.pruned(again.open_trial(trial.number), [])
    # Epochs seen at once (a slow poll, or a finished run) are decided one by one, in order.
    search.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    trial = new_trial()
    assert search.pruned(
        trial, [{"epoch": 1, "val_accuracy": 0.1}, {"epoch": 2, "val_accuracy": 0.9}]
    )
    assert search.study.trials[trial.number].intermediate_values == {1: 0.1}


# ------------------------------------------------------------------ killed and resumed


def start_search(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """The search in its own process group (a kill of the group is a kill of the search; its
    trial's process dies with it)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    with open(log, "ab") as out:
        return subprocess.Popen(
            [*TUNE, *args],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def checkpoints(outputs: Path) -> set[Path]:
    return set(outputs.glob("*/checkpoints/step-*"))


def summary_of(outputs: Path, study: str) -> dict:
    return durable.read_record(outputs / ".tune" / f"{study}.json")


def kill_mid_trial(args: list[str], cwd: Path, log: Path, new_run: bool) -> None:
    """Start the search; SIGKILL its process group at the first checkpoint newer than those
    present at launch (`new_run`: in a run directory that had none, i.e. a later trial)."""
    outputs = cwd / "outputs"
    before = checkpoints(outputs)
    runs_before = {p.parent.parent for p in before}
    proc = start_search(args, cwd, log)
    deadline = time.monotonic() + 300
    while True:
        new = {p for p in checkpoints(outputs) - before if not p.name.startswith(".")}
        if new_run:
            new = {p for p in new if p.parent.parent not in runs_before}
        if new:
            break
        assert proc.poll() is None, f"the search ended before it was killed:\n{log.read_text()}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    running = [t for t in summary_of(outputs, "kills")["trials"] if t["state"] == "RUNNING"]
    assert len(running) == 1, running
    killed = rundir.RunDir(outputs / running[0]["run"])
    assert killed.root == next(iter(new)).parent.parent
    assert killed.read_stage("fit") is None  # killed mid-trial, before its fit was done


def run_search(args: list[str], cwd: Path, log: Path) -> dict:
    proc = start_search(args, cwd, log)
    assert proc.wait(timeout=900) == 0, log.read_text()
    return summary_of(cwd / "outputs", "kills")


@pytest.mark.slow
def test_a_search_killed_mid_trial_twice_ends_as_an_uninterrupted_one(tmp_path: Path) -> None:
    args = ["--trials", "4", "--study", "kills", *SPACE, *TINY]
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    killed.mkdir()
    clean.mkdir()
    log = tmp_path / "killed.log"
    kill_mid_trial(args, killed, log, new_run=False)  # in trial 0
    kill_mid_trial(args, killed, log, new_run=True)  # in trial 1, after trial 0 resumed
    resumed = run_search(args, killed, log)
    reference = run_search(args, clean, tmp_path / "clean.log")

    def by_number(summary: dict) -> list[dict]:
        return sorted(summary["trials"], key=lambda t: t["number"])

    trials, expected = by_number(resumed), by_number(reference)
    assert [t["number"] for t in trials] == [0, 1, 2, 3]  # none repeated, none lost
    assert all(t["state"] == "COMPLETE" for t in trials + expected)
    for got, want in zip(trials, expected, strict=True):
        assert (got["params"], got["value"], got["run"]) == (
            want["params"],
            want["value"],
            want["run"],
        )
        assert_same_state(
            final_state(killed / "outputs" / got["run"]),
            final_state(clean / "outputs" / want["run"]),
        )
    # The two interrupted trials resumed from their checkpoints, the others ran once.
    resumes = [
        rundir.RunDir(killed / "outputs" / t["run"]).read_stage("fit")["resumes"] for t in trials
    ]
    assert [len(r) for r in resumes] == [1, 1, 0, 0], resumes
    assert [t["number"] for t in resumed["trials"]] == [t["number"] for t in reference["trials"]]


@pytest.mark.slow
def test_ctrl_c_stops_the_trial_at_a_checkpoint_and_leaves_it_to_resume(tmp_path: Path) -> None:
    outputs = tmp_path / "outputs"
    log = tmp_path / "search.log"
    proc = start_search(["--trials", "2", "--study", "kills", *SPACE, *TINY], tmp_path, log)
    deadline = time.monotonic() + 300
    while not checkpoints(outputs):
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # to the search alone: it forwards it to its trial
    assert proc.wait(timeout=120) == 130, log.read_text()
    (trial,) = summary_of(outputs, "kills")["trials"]
    assert trial["state"] == "RUNNING"
    run = rundir.RunDir(outputs / trial["run"])
    assert not rundir.is_running(run)  # the trial's process is gone too
    assert (run.read_session() or {}).get("state") == "interrupted"
    assert "run the same command again" in log.read_text().lower()
