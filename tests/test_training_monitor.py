"""Training curves on the global step, the real epoch count and a readable log.

A 16^3 run of two epochs (of three) in another process (grappler's messages go to the
process's stderr), then resumed here for the third: the TensorBoard event files hold the
loss and its terms at every step, 1 to 9, never restarting, and each epoch's mean.
"""

import glob
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from aldk_tf.cli import train as train_cli
from aldk_tf.training import monitor

from synthetic import write_blob_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TERMS = ("loss", "similarity", "smoothness")


def scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of every event file under ``log_dir``, in the
    order they were written."""
    events = []
    for path in glob.glob(os.path.join(log_dir, "**", "*tfevents*"), recursive=True):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                events.append((event.wall_time, value.tag, event.step,
                               float(tf.make_ndarray(value.tensor))))
    found: dict[str, list] = {}
    for _, tag, step, value in sorted(events, key=lambda e: e[0]):
        found.setdefault(tag, []).append((step, value))
    return found


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """Epochs 1 and 2 of 3 (3 steps each) of a 16^3 student, by the CLI in a process."""
    folder = tmp_path_factory.mktemp("monitor")
    dataset = write_blob_dataset(str(folder / "data"), size=16, train=3, validation=2,
                                 test=2)
    result = subprocess.run(
        [sys.executable, "-m", "aldk_tf.cli.train", "-b", "LDR", "-d", dataset,
         "--batch", "1", "--round", "3", "--epochs", "3", "--max-steps", "6",
         "--output", "run", "--weights-dir", str(folder / "weights"),
         "--validate-every", "0", "--channels", "4", "--verbose", "2"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-2000:]
    return str(folder / "weights" / "run"), result


def test_console_counts_the_runs_epochs_and_stays_readable(two_epochs):
    _, result = two_epochs
    output = result.stdout + result.stderr
    assert "Epoch 2/3" in output and "Epoch 2/2" not in output, output[-2000:]
    assert "remapper failed" not in output, output[-2000:]


def test_loss_terms_are_logged_at_every_step_of_a_short_run(two_epochs):
    run_dir, _ = two_epochs
    found = scalars(os.path.join(run_dir, "logs"))
    for term in TERMS:
        steps = [step for step, _ in found[f"loss/{term}"]]
        assert steps == [1, 2, 3, 4, 5, 6], (term, steps)
        assert all(np.isfinite(value) for _, value in found[f"loss/{term}"])
        # Epoch means at each epoch's last step: the mean of its steps' values.
        per_step = dict(found[f"loss/{term}"])
        epochs = found[f"epoch/{term}"]
        assert [step for step, _ in epochs] == [3, 6]
        for step, mean in epochs:
            np.testing.assert_allclose(mean, np.mean([per_step[s] for s in
                                                      range(step - 2, step + 1)]),
                                       rtol=1e-5)
    total = np.array([v for _, v in found["loss/loss"]])
    parts = sum(np.array([v for _, v in found[f"loss/{name}"]])
                for name in ("similarity", "smoothness", "det", "ortho"))
    np.testing.assert_allclose(total, parts, rtol=1e-4)     # the terms add up


def test_a_resumed_run_continues_the_step_axis(two_epochs, tmp_path, capsys):
    import shutil
    run_dir = shutil.copytree(two_epochs[0], str(tmp_path / "run"))
    assert train_cli.main(["-c", run_dir, "--verbose", "2"]) == 0
    assert "Epoch 3/3" in capsys.readouterr().out
    found = scalars(os.path.join(run_dir, "logs"))
    steps = [step for step, _ in found["loss/loss"]]
    assert steps == list(range(1, 10)), steps                # strictly increasing
    assert [step for step, _ in found["epoch/loss"]] == [3, 6, 9]
    # bench/curves.py reads the same curves: its 3-step windows are the epoch means.
    import importlib.util
    spec = importlib.util.spec_from_file_location("curves", os.path.join(ROOT, "bench",
                                                                         "curves.py"))
    curves = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(curves)
    windows = curves.windows_of_points(curves.step_means(run_dir, "loss"), 3)
    assert sorted(windows) == [3, 6, 9]
    np.testing.assert_allclose([windows[s] for s in (3, 6, 9)],
                               [v for _, v in found["epoch/loss"]], rtol=1e-5)


@pytest.mark.parametrize("total, every, expected", [
    (6, None, 1), (400, None, 2), (10_000, None, 50), (100_000, None, 50), (6, 4, 4)])
def test_log_interval(total, every, expected):
    assert monitor.log_interval(total, every) == expected


def test_log_every_flag_is_checked(tmp_path, capsys):
    assert train_cli.main(["-b", "LDR", "-d", "x.json", "--log-every", "0", "--output",
                           "x", "--weights-dir", str(tmp_path / "w")]) == 2
    assert "--log-every: expected an integer >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
