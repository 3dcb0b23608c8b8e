"""Prepared data is stored once per content in run.outputs/.cache/data, not once per run."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import cli

from pipeline import durable, rundir

DATA = ["data=sample", "data.train_size=200", "data.test_size=100"]


def entries(outputs: Path) -> list[Path]:
    cache = rundir.data_cache(outputs)
    return sorted(
        p
        for p in cache.iterdir()
        if p.is_dir() and "." not in p.name  # not .tmp-, .corrupt
    )


def test_a_2x2_sweep_stores_the_dataset_once(tmp_path: Path) -> None:
    result = cli(["data", "-m", *DATA, "seed=1,2", "model.dropout=0.1,0.2"], tmp_path)
    assert result.returncode == 0, result.stderr
    outputs = tmp_path / "outputs"
    runs = rundir.run_dirs_under(outputs)
    assert len(runs) == 4
    (prepared,) = entries(outputs)
    durable.verify_dir(prepared)
    for run in runs:
        assert rundir.RunDir(run).data == prepared
        assert not (run / rundir.DATA).exists()  # no copy of its own
    # Restarting one run (or deleting it) leaves the others' data alone.
    restarted = cli(["data", *DATA, "seed=1", "model.dropout=0.1", "run.restart=true"], tmp_path)
    assert restarted.returncode == 0, restarted.stderr
    assert entries(outputs) == [prepared]
    durable.verify_dir(prepared)
    status = cli(["status"], tmp_path)
    assert status.returncode == 0, status.stderr
    assert "shared prepared data: 1 dataset(s)" in status.stdout
    rows = json.loads(cli(["status", "--json"], tmp_path).stdout)
    assert {row["data_dir"] for row in rows} == {str(prepared.relative_to(tmp_path))}
    assert all(row["disk_bytes"] < 100_000 for row in rows)  # the runs' own files only


def test_another_slice_is_another_entry_and_a_damaged_one_is_rebuilt(tmp_path: Path) -> None:
    assert cli(["data", *DATA], tmp_path).returncode == 0
    assert cli(["data", *DATA, "data.train_size=300"], tmp_path).returncode == 0
    outputs = tmp_path / "outputs"
    assert len(entries(outputs)) == 2
    small, large = (rundir.RunDir(r) for r in rundir.run_dirs_under(outputs))
    if "300" in small.name:
        small, large = large, small
    first = small.data
    npz = first / rundir.PREPARED
    npz.write_bytes(npz.read_bytes()[:-100])
    result = cli(["data", *DATA], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Prepared data failed verification" in result.stdout + result.stderr
    assert sorted(entries(outputs)) == sorted([first, large.data])
    durable.verify_dir(first)
    assert list(rundir.data_cache(outputs).glob("*.corrupt"))
