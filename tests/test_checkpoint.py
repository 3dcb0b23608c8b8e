"""pipeline.checkpoint: committed step directories, fallback past corrupt ones, retention."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from pipeline import checkpoint, durable


def state(step: int) -> dict[str, np.ndarray]:
    """Arrays that differ per step, so the test can tell which checkpoint it got back."""
    rng = np.random.default_rng(step)
    return {
        "dense/kernel": rng.standard_normal((30, 10)).astype(np.float32),
        "optimizer/iterations": np.array(step, dtype=np.int64),
        "rng": rng.integers(0, 2**32, 4, dtype=np.uint32),
    }


def save_steps(root: Path, steps: list[int]) -> None:
    for step in steps:
        checkpoint.save(root, step, state(step), {"epoch": step // 10, "best_val": 0.5})


def entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def assert_state(ckpt: checkpoint.Checkpoint, step: int) -> None:
    expected = state(step)
    assert sorted(ckpt.arrays) == sorted(expected)
    for key, value in expected.items():
        assert ckpt.arrays[key].dtype == value.dtype
        assert np.array_equal(ckpt.arrays[key], value), key


def test_save_and_load(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    path = checkpoint.save(root, 12, state(12), {"epoch": 1, "best_val": 0.25})
    assert path == root / "step-000000012"
    assert entries(path) == ["MANIFEST.json", "state.npz"]
    ckpt = checkpoint.load(path)
    assert ckpt.step == 12 and ckpt.path == path
    assert ckpt.meta == {"epoch": 1, "best_val": 0.25, "step": 12}
    assert_state(ckpt, 12)


def test_committed_steps_ignores_other_names(tmp_path: Path) -> None:
    save_steps(tmp_path, [30, 3, 12])
    (tmp_path / "step-000000040.corrupt").mkdir()
    (tmp_path / ".step-000000050.tmp-77").mkdir()
    (tmp_path / "step-7").mkdir()
    assert checkpoint.committed_steps(tmp_path) == [3, 12, 30]
    assert checkpoint.committed_steps(tmp_path / "missing") == []


def test_load_latest_returns_newest(tmp_path: Path) -> None:
    save_steps(tmp_path, [3, 6, 9])
    ckpt = checkpoint.load_latest(tmp_path)
    assert ckpt is not None and ckpt.step == 9
    assert_state(ckpt, 9)


def test_load_latest_only_step(tmp_path: Path) -> None:
    save_steps(tmp_path, [3, 6, 9])
    ckpt = checkpoint.load_latest(tmp_path, only_step=6)
    assert ckpt is not None and ckpt.step == 6
    assert_state(ckpt, 6)
    assert checkpoint.load_latest(tmp_path, only_step=7) is None
    assert entries(tmp_path) == ["step-000000003", "step-000000006", "step-000000009"]


def test_load_latest_of_empty_or_missing_root(tmp_path: Path) -> None:
    assert checkpoint.load_latest(tmp_path / "missing") is None
    assert checkpoint.load_latest(tmp_path) is None


def truncate(path: Path) -> None:
    raw = (path / "state.npz").read_bytes()
    (path / "state.npz").write_bytes(raw[: len(raw) // 3])


def flip_byte(path: Path) -> None:
    raw = bytearray((path / "state.npz").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (path / "state.npz").write_bytes(bytes(raw))


def delete_state(path: Path) -> None:
    (path / "state.npz").unlink()


def delete_manifest(path: Path) -> None:
    (path / durable.MANIFEST).unlink()


DAMAGE = [truncate, flip_byte, delete_state, delete_manifest]


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_load_latest_falls_back_past_a_damaged_newest(
    tmp_path: Path, damage, caplog: pytest.LogCaptureFixture
) -> None:
    save_steps(tmp_path, [3, 6])
    bad = tmp_path / "step-000000006"
    damage(bad)
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint"):
        ckpt = checkpoint.load_latest(tmp_path)
    assert ckpt is not None and ckpt.step == 3
    assert ckpt.path == tmp_path / "step-000000003"
    assert_state(ckpt, 3)
    assert entries(tmp_path) == ["step-000000003", "step-000000006.corrupt"]
    assert checkpoint.committed_steps(tmp_path) == [3]
    assert len(caplog.records) == 1
    assert caplog.messages[0].startswith(f"Checkpoint {bad} failed verification: ")
    assert caplog.messages[0].endswith(
        "Set aside as step-000000006.corrupt; trying the next older one."
    )
    # The evidence is kept: the set-aside directory still holds what was there.
    left = {delete_state: ["MANIFEST.json"], delete_manifest: ["state.npz"]}
    assert entries(tmp_path / "step-000000006.corrupt") == left.get(
        damage, ["MANIFEST.json", "state.npz"]
    )


def test_load_latest_skips_several_bad_ones(tmp_path: Path) -> None:
    save_steps(tmp_path, [3, 6, 9, 12])
    truncate(tmp_path / "step-000000012")
    flip_byte(tmp_path / "step-000000009")
    ckpt = checkpoint.load_latest(tmp_path)
    assert ckpt is not None and ckpt.step == 6
    assert entries(tmp_path) == [
        "step-000000003",
        "step-000000006",
        "step-000000009.corrupt",
        "step-000000012.corrupt",
    ]


def test_load_latest_all_bad_returns_none(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    save_steps(tmp_path, [3, 6])
    delete_state(tmp_path / "step-000000003")
    truncate(tmp_path / "step-000000006")
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint"):
        assert checkpoint.load_latest(tmp_path) is None
    assert entries(tmp_path) == ["step-000000003.corrupt", "step-000000006.corrupt"]
    assert (
        caplog.messages[-1] == f"No checkpoint under {tmp_path} verified; starting this stage over."
    )


def test_second_corruption_of_same_step_gets_a_new_name(tmp_path: Path) -> None:
    save_steps(tmp_path, [3, 6])
    flip_byte(tmp_path / "step-000000006")
    assert checkpoint.load_latest(tmp_path).step == 3
    save_steps(tmp_path, [6])  # training redid step 6 ... and it broke again
    truncate(tmp_path / "step-000000006")
    assert checkpoint.load_latest(tmp_path).step == 3
    assert entries(tmp_path) == [
        "step-000000003",
        "step-000000006.corrupt",
        "step-000000006.corrupt2",
    ]


@pytest.mark.parametrize(
    "keep,best,left",
    [
        (2, None, [4, 5]),
        (2, 1, [1, 4, 5]),
        (2, 5, [4, 5]),  # the best is among the newest: nothing extra kept
        (1, 3, [3, 5]),
        (5, None, [1, 2, 3, 4, 5]),
        (9, 2, [1, 2, 3, 4, 5]),
    ],
)
def test_retain(tmp_path: Path, keep: int, best: int | None, left: list[int]) -> None:
    save_steps(tmp_path, [1, 2, 3, 4, 5])
    checkpoint.retain(tmp_path, keep, best)
    assert entries(tmp_path) == [f"step-{s:09d}" for s in left]  # no temp left behind
    for step in left:
        assert_state(checkpoint.load(checkpoint.path_for(tmp_path, step)), step)


def test_retain_leaves_set_aside_evidence(tmp_path: Path) -> None:
    save_steps(tmp_path, [1, 2, 3])
    flip_byte(tmp_path / "step-000000003")
    checkpoint.load_latest(tmp_path)
    checkpoint.retain(tmp_path, 1, None)
    assert entries(tmp_path) == ["step-000000002", "step-000000003.corrupt"]


def test_a_reader_that_does_not_own_the_directory_skips_bad_ones_without_moving_them(
    tmp_path: Path,
) -> None:
    save_steps(tmp_path, [1, 2])
    state_file = checkpoint.path_for(tmp_path, 2) / "state.npz"
    state_file.write_bytes(state_file.read_bytes()[:-10])
    before = entries(tmp_path)
    ckpt = checkpoint.load_latest(tmp_path, owner=False)
    assert ckpt is not None
    assert_state(ckpt, 1)
    assert entries(tmp_path) == before  # nothing set aside: that is the owner's job
    assert checkpoint.load_latest(tmp_path).step == 1  # the owner does set it aside
    assert entries(tmp_path) != before
