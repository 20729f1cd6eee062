"""Fault injection: bad flags, busy and half-made run directories, changed settings on
resume, corrupt checkpoints, weights and teacher flows, shards of other weights.

Each case checks the exit code, the one ``error:`` line (it names the file or flag and
what was expected), that no traceback is printed, and that nothing partial is left and
nothing is lost. 16^3 generated data; the command-line ``main``s run in this process
except where another process is the point (a lock, kill -9).
"""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import tensorflow as tf

from aldk_tf.training import runs
from aldk_tf.training.checkpoints import save_weights_atomic
from aldk_tf.cli import evaluate as evaluate_cli
from aldk_tf.cli import export as export_cli
from aldk_tf.cli import train as train_cli
from aldk_tf.config import ModelConfig, RunConfig
from aldk_tf.data import list_pairs, load_dataset_config

from scripts import one_error_line
from synthetic import write_blob_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_blob_dataset(str(tmp_path_factory.mktemp("data")), size=SIZE, train=3,
                              validation=2, test=2)


def train_flags(dataset, weights_dir, output, *extra):
    return ["-b", "LDR", "-d", dataset, "--batch", "1", "--round", "100", "--epochs",
            "1", "--output", output, "--weights-dir", str(weights_dir),
            "--checkpoint-every", "2", "--validate-every", "0", "--channels", "4", "--verbose",
            "0", *extra]


@pytest.fixture(scope="module")
def trained_run(dataset, tmp_path_factory):
    """A student run stopped at step 4 (checkpoints 2 and 4, model.weights.h5)."""
    weights = tmp_path_factory.mktemp("weights")
    assert train_cli.main(train_flags(dataset, weights, "base", "--max-steps", "4")) == 0
    return str(weights / "base")


@pytest.fixture
def run(trained_run, tmp_path):
    """A private copy of the trained run."""
    return shutil.copytree(trained_run, str(tmp_path / "run"))


def latest_step(run_dir):
    latest = tf.train.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    return int(latest.rsplit("-", 1)[1])


def truncate(path, keep=0.5):
    os.truncate(path, int(os.path.getsize(path) * keep))


# ------------------------------------------------------------------ a failed start
@pytest.mark.parametrize("flag,value", [
    ("--batch", "0"), ("--round", "-2"), ("--epochs", "0"), ("--lr", "nan"),
    ("--lr", "inf"), ("--lr", "0"), ("--adv-period", "0"), ("--critic-period", "0"),
    ("--n-cascades", "0"), ("--beta", "1.5"), ("--critic-lr", "0"),
    ("--max-steps", "0"), ("--checkpoint-every", "0"), ("--clip-norm", "inf"),
    ("--flow-distill", "-0.5"), ("--flow-distill", "inf")])
def test_bad_flag_is_one_line_and_creates_nothing(dataset, tmp_path, capsys, flag, value):
    weights = tmp_path / "weights"
    code = train_cli.main(train_flags(dataset, weights, "x", flag, value))
    assert code == 2
    one_error_line(capsys, flag.split("/")[-1], value.lstrip("-"), "expected")
    assert not weights.exists()


def test_more_steps_than_the_step_counter_holds_is_refused(dataset, tmp_path, capsys):
    weights = tmp_path / "weights"
    code = train_cli.main(train_flags(dataset, weights, "x", "--max-steps", "1",
                                      "--epochs", "99999999999999999999"))
    assert code == 2
    one_error_line(capsys, "--round 100 x --epochs 99999999999999999999", "expected")
    assert not weights.exists()


@pytest.mark.parametrize("output, expected", [
    ("../..", "expected a run name"), ("/abs/run", "expected a run name"),
    (".", "expected a run name"), ("a_file/run", "is a file, not a folder")])
def test_output_must_name_a_run_inside_the_weights_folder(dataset, tmp_path, capsys,
                                                          output, expected):
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "a_file").write_text("not a folder")
    assert train_cli.main(train_flags(dataset, weights, output)) == 2
    one_error_line(capsys, f"--output {output}", expected)
    assert sorted(os.listdir(weights)) == ["a_file"]
    assert sorted(os.listdir(tmp_path)) == ["weights"]


def test_weights_dir_that_is_a_file_is_refused(dataset, tmp_path, capsys):
    (tmp_path / "weights").write_text("not a folder")
    assert train_cli.main(train_flags(dataset, tmp_path / "weights", "x")) == 2
    one_error_line(capsys, "--weights-dir", "expected a folder")
    assert (tmp_path / "weights").read_text() == "not a folder"


def test_override_without_a_resumed_run_is_refused(dataset, tmp_path, capsys):
    assert train_cli.main(train_flags(dataset, tmp_path, "x", "--override")) == 2
    one_error_line(capsys, "--override", "-c")
    assert not (tmp_path / "x").exists()


def test_output_with_a_resumed_run_is_refused(run, capsys):
    before = open(os.path.join(run, "config.json")).read()
    assert train_cli.main(["-c", run, "--output", "elsewhere"]) == 2
    one_error_line(capsys, "--output", f"-c {run}")
    assert open(os.path.join(run, "config.json")).read() == before


def test_teacher_flow_extraction_refuses_batch_0(run, capsys):
    from aldk_tf.cli import teacher_flows
    from aldk_tf.training.flow_store import flows_path
    assert teacher_flows.main(["-c", run, "--batch", "0"]) == 2
    one_error_line(capsys, "--batch", "expected an integer >= 1, got 0")
    assert not os.path.exists(flows_path(run))


def test_start_failing_after_creation_removes_its_run_directory(dataset, run, tmp_path,
                                                                 capsys):
    """An ALDK student whose teacher's weights are truncated: refused, nothing left."""
    truncate(runs.weights_path(run))
    weights = tmp_path / "weights"
    code = train_cli.main(train_flags(dataset, weights, "student", "--aldk", "--teacher",
                                      run))
    assert code == 2
    one_error_line(capsys, runs.weights_path(run), "unreadable weights")
    assert not (weights / "student").exists()


def test_new_run_on_an_existing_run_is_refused_and_leaves_it_intact(dataset, run,
                                                                     capsys):
    before = open(os.path.join(run, "config.json")).read()
    code = train_cli.main(train_flags(dataset, os.path.dirname(run), "run", "--lr", "0.5"))
    assert code == 2
    one_error_line(capsys, run, "a run already exists", "-c")
    assert open(os.path.join(run, "config.json")).read() == before
    assert latest_step(run) == 4


# ------------------------------------------------------------ settings on resume
def test_resume_refuses_flags_that_change_what_is_trained(run, capsys):
    before = open(os.path.join(run, "config.json")).read()
    code = train_cli.main(["-c", run, "--lr", "0.5", "--epochs", "3", "--batch", "4",
                           "--verbose", "0"])
    assert code == 2
    line = one_error_line(capsys, "train.lr 0.0001 -> 0.5", "train.batch 1 -> 4",
                          "--override")
    assert "train.epochs" not in line                 # a budget, not refused
    assert open(os.path.join(run, "config.json")).read() == before
    assert latest_step(run) == 4


def test_resume_applies_and_records_a_longer_budget(run, capsys):
    code = train_cli.main(["-c", run, "--epochs", "2", "--max-steps", "4", "--verbose", "0"])
    assert code == 0, capsys.readouterr().err
    config = runs.load_run_config(run)
    assert config.train.epochs == 2
    assert config.history == [{"at_step": 4, "changes": {"train.epochs": [1, 2]},
                               "override": False}]


def test_override_applies_and_records_the_change(run, capsys):
    code = train_cli.main(["-c", run, "--lr", "5e-4", "--override", "--max-steps", "4",
                           "--verbose", "0"])
    assert code == 0, capsys.readouterr().err
    config = runs.load_run_config(run)
    assert config.train.lr == 5e-4
    assert config.history[-1] == {"at_step": 4, "changes": {"train.lr": [1e-4, 5e-4]},
                                  "override": True}


def test_checkpoint_of_another_model_is_refused_whole(run, capsys):
    """n_cascades 1 -> 2 with --override: the checkpoint lacks the second cascade."""
    before = open(os.path.join(run, "config.json")).read()
    code = train_cli.main(["-c", run, "-n", "2", "--override", "--verbose", "0"])
    assert code == 2
    one_error_line(capsys, "ckpt-4", "does not match the model")
    assert open(os.path.join(run, "config.json")).read() == before


def test_train_refuses_an_unrecorded_change_of_settings(run):
    """The demo and the benchmarks call train() directly: another seed is no resume."""
    from aldk_tf.training.run import train
    config = runs.load_run_config(run)
    config.train.seed = 7
    with pytest.raises(runs.RunError, match=r"train.seed 0 -> 7"):
        train(config, run, verbose=0, max_steps=5)


def test_every_train_flag_is_a_setting_or_declared_not_one():
    dests = {action.dest for action in train_cli.make_parser()._actions} - {"help"}
    assert dests == train_cli.FLAG_SETTINGS.keys() | train_cli.NOT_SETTINGS


# ------------------------------------------------------------------ checkpoints
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(run, capsys, caplog):
    data = os.path.join(run, "checkpoints", "ckpt-4.data-00000-of-00001")
    truncate(data)
    os.makedirs(os.path.join(run, "checkpoints", "ckpt-6_temp"))     # a cut-off save
    with caplog.at_level(logging.WARNING):
        code = train_cli.main(["-c", run, "--max-steps", "3", "--verbose", "0"])
    assert code == 0, capsys.readouterr().err
    warnings = [r.getMessage() for r in caplog.records if "unreadable checkpoint" in
                r.getMessage()]
    assert len(warnings) == 1 and "ckpt-4" in warnings[0] and "ckpt-2" in warnings[0]
    assert latest_step(run) == 3                      # trained on from step 2
    assert not os.path.exists(os.path.join(run, "checkpoints", "ckpt-6_temp"))


def test_no_readable_checkpoint_is_one_line(run, capsys):
    for step in (2, 4):
        truncate(os.path.join(run, "checkpoints", f"ckpt-{step}.index"))
    assert train_cli.main(["-c", run, "--verbose", "0"]) == 2
    one_error_line(capsys, "no readable checkpoint", "ckpt-4")


@pytest.mark.parametrize("tool", ["evaluate", "export"])
def test_truncated_weights_are_one_line_and_write_nothing(run, tmp_path, capsys, tool):
    truncate(runs.weights_path(run))
    out = tmp_path / "out"
    if tool == "evaluate":
        code = evaluate_cli.main(["-c", run, "--out", str(out), "--no-progress"])
    else:
        code = export_cli.main(["-c", run, "--out", str(out), "--tflite", "none"])
    assert code == 2
    one_error_line(capsys, runs.weights_path(run), "unreadable weights")
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]


# ------------------------------------------------------------------- evaluation
def test_exported_report_names_the_exported_model_and_merge_checks_weights(
        run, tmp_path, capsys):
    out = str(tmp_path / "export")
    assert export_cli.main(["-c", run, "--out", out, "--tflite", "none"]) == 0
    version = os.path.join(out, "1")
    other = shutil.copytree(run, str(tmp_path / "other"))        # another run's -c
    reports = str(tmp_path / "reports")
    flags = ["--out", reports, "--no-progress"]
    assert evaluate_cli.main(["-c", other, "--exported", version, *flags]) == 0
    document = json.load(open(os.path.join(reports, "run-savedmodel.json")))
    assert document["run"] == run and document["exported"] == version
    assert document["weights_sha256"] == evaluate_cli.fingerprint(version)
    assert document["export_info"]["run"] == run
    assert not os.path.exists(os.path.join(reports, "other-savedmodel.json"))

    # Two shards evaluated with different weights are not merged.
    _, model = runs.load_model(other)
    model.set_weights([w + 0.01 for w in model.get_weights()])
    save_weights_atomic(model, other)
    assert evaluate_cli.main(["-c", run, "--shard", "1/2", *flags]) == 0
    os.replace(os.path.join(reports, "run.shard-1-of-2.json"),
               os.path.join(reports, "mixed.shard-1-of-2.json"))
    assert evaluate_cli.main(["-c", other, "--shard", "2/2", *flags]) == 0
    os.replace(os.path.join(reports, "other.shard-2-of-2.json"),
               os.path.join(reports, "mixed.shard-2-of-2.json"))
    capsys.readouterr()
    parts = [os.path.join(reports, f"mixed.shard-{i}-of-2.json") for i in (1, 2)]
    assert evaluate_cli.main(["--merge", *parts, "--out", reports]) == 2
    one_error_line(capsys, parts[1], "other weights")
    assert not os.path.exists(os.path.join(reports, "mixed.json"))


def test_export_removes_the_folders_of_killed_exports_only(tmp_path):
    from aldk_tf.deploy import export
    dead, running, fresh = (tmp_path / name for name in (".tmp-1-a", ".tmp-2-b", ".tmp-3-c"))
    for folder in (dead, running, fresh):
        folder.mkdir()
        (folder / "saved_model.pb").write_bytes(b"partial")
    hour_ago = time.time() - 3600
    for folder in (dead, running):
        os.utime(folder, (hour_ago, hour_ago))
    held = export._hold(str(running))            # as an export in progress holds it
    try:
        assert export.remove_abandoned_staging(str(tmp_path)) == [str(dead)]
    finally:
        os.close(held)
    assert running.exists() and fresh.exists() and not dead.exists()


def test_fake_exported_model_is_one_line(run, tmp_path, capsys):
    fake = tmp_path / "1"
    fake.mkdir()
    (fake / "saved_model.pb").write_bytes(b"not a protobuf")
    lite = tmp_path / "model.tflite"
    lite.write_bytes(b"not a flatbuffer")
    for path in (str(fake), str(lite)):
        code = evaluate_cli.main(["-c", run, "--exported", path, "--out",
                                  str(tmp_path / "reports"), "--no-progress"])
        assert code == 2
        one_error_line(capsys, path, "expected the output of export.py")


# ---------------------------------------------------------------- teacher flows
@pytest.fixture
def teacher_run(dataset, tmp_path):
    folder = str(tmp_path / "teacher")
    config = RunConfig(dataset=dataset, model=ModelConfig(
        role="teacher", base="vtn", affine="vtn", channels=4, image_size=(SIZE,) * 3))
    config.save(folder)
    teacher = config.model.build()
    save_weights_atomic(teacher, folder)
    return folder, teacher


def test_truncated_teacher_flows_are_set_aside_and_extracted_again(dataset, teacher_run,
                                                                   capsys):
    from aldk_tf.training.flow_store import stored_keys
    from aldk_tf.training.run import ensure_teacher_flows
    folder, teacher = teacher_run
    config = load_dataset_config(dataset)
    pairs = list_pairs(config, "1")[:2]
    path = ensure_teacher_flows(folder, teacher, config, pairs)
    truncate(path, 0.3)
    assert ensure_teacher_flows(folder, teacher, config, pairs) == path
    err = capsys.readouterr().err
    assert "unreadable" in err and "Traceback" not in err
    assert os.path.exists(path + ".stale")            # kept, not deleted
    assert stored_keys(path) == {f"{f}-{m}" for f, m in pairs}


def test_teacher_flows_of_another_size_are_refused_before_training(dataset, teacher_run,
                                                                    tmp_path, capsys):
    from aldk_tf.training.run import ensure_teacher_flows
    folder, teacher = teacher_run
    config = load_dataset_config(dataset)
    path = ensure_teacher_flows(folder, teacher, config, list_pairs(config, "1"))
    with h5py.File(path, "a") as handle:            # one flow of an 8^3 run, same attrs
        flows = []
        handle.visititems(lambda name, node: flows.append(name)
                          if isinstance(node, h5py.Dataset) else None)
        key = sorted(flows)[0]
        attrs = dict(handle[key].attrs)
        del handle[key]
        handle.create_dataset(key, data=np.zeros((8, 8, 8, 3), np.float16))
        handle[key].attrs.update(attrs)
    weights = tmp_path / "weights"
    code = train_cli.main(train_flags(dataset, weights, "student", "--flow-distill",
                                      "0.1", "--teacher", folder, "--max-steps", "2"))
    assert code == 2
    one_error_line(capsys, path, "(8, 8, 8, 3)", f"expected ({SIZE}, {SIZE}, {SIZE}, 3)")
    assert not (weights / "student").exists()


# ------------------------------------------------- another process: lock, kill -9
CLAIM = """
import json, os, sys, time
from aldk_tf.training import runs
run_dir, name = sys.argv[1], sys.argv[2]
while time.time() < float(sys.argv[3]):          # start together
    pass
try:
    with runs.claim_run(run_dir, new=True):
        with open(os.path.join(run_dir, "config.json"), "w") as handle:
            json.dump({"owner": name}, handle)
        time.sleep(1.0)
except runs.RunError as error:
    print(error)
    sys.exit(2)
"""


def test_concurrent_starts_on_one_run_directory_let_exactly_one_run(tmp_path):
    """Four processes claim one new run directory at the same instant (no TensorFlow:
    the claim is the part that raced before the lock)."""
    run_dir = str(tmp_path / "run")
    start = time.time() + 1.0
    processes = [subprocess.Popen([sys.executable, "-c", CLAIM, run_dir, f"p{i}",
                                   str(start)], stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONPATH": ROOT})
                 for i in range(4)]
    results = [(process.wait(timeout=60), process.stdout.read()) for process in processes]
    winners = [i for i, (code, _) in enumerate(results) if code == 0]
    assert len(winners) == 1, results
    for code, out in results:
        if code != 0:
            assert code == 2 and run_dir in out and (
                "another training run holds" in out or "a run already exists" in out), out
    with open(os.path.join(run_dir, "config.json")) as handle:
        assert json.load(handle) == {"owner": f"p{winners[0]}"}


@pytest.mark.slow
def test_a_held_run_directory_is_refused_and_kill_9_then_resume(dataset, tmp_path,
                                                               capsys):
    weights = tmp_path / "weights"
    command = [sys.executable, os.path.join(ROOT, "train.py"),
               *train_flags(dataset, weights, "held", "--round", "1000")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL,
                               env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    run_dir = str(weights / "held")
    checkpoints = weights / "held" / "checkpoints"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not list(checkpoints.glob("ckpt-2.index")):
            assert process.poll() is None, "the training process ended early"
            time.sleep(0.2)
        # The other process holds the directory: a second start and a resume stop.
        config_before = open(os.path.join(run_dir, "config.json")).read()
        assert train_cli.main(train_flags(dataset, weights, "held", "--max-steps",
                                          "2")) == 2
        one_error_line(capsys, run_dir, "another training run holds")
        assert train_cli.main(["-c", run_dir, "--max-steps", "2", "--verbose", "0"]) == 2
        one_error_line(capsys, run_dir, "another training run holds")
        assert open(os.path.join(run_dir, "config.json")).read() == config_before
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    saved = latest_step(run_dir)
    assert saved >= 2
    # The lock died with the process: the same run resumes and ends at the same step.
    assert train_cli.main(["-c", run_dir, "--max-steps", str(saved + 1), "--verbose", "0"]) == 0
    assert latest_step(run_dir) == saved + 1


# ------------------------------------------- files and flags of the other tools
@pytest.mark.parametrize("text", ["", "{not json", "[]", '{"dataset": "x.json"}',
                                  "model-channels"])
def test_corrupt_or_foreign_config_json_is_one_line(run, tmp_path, capsys, text):
    """config.json empty, not JSON, not an object, without a model, or with a setting
    of another type: one line naming it, for every tool that reads a run."""
    path = os.path.join(run, "config.json")
    if text == "model-channels":
        document = json.load(open(path))
        document["model"]["channels"] = "four"
        text = json.dumps(document)
    with open(path, "w") as handle:
        handle.write(text)
    out = tmp_path / "out"
    assert evaluate_cli.main(["-c", run, "--out", str(out), "--no-progress"]) == 2
    one_error_line(capsys, path, "not a valid run configuration")
    assert train_cli.main(["-c", run, "--verbose", "0"]) == 2
    one_error_line(capsys, path, "not a valid run configuration")
    assert not out.exists()


def test_failed_start_removes_the_weights_folder_it_made(dataset, tmp_path, capsys):
    """A dataset whose HDF5 file is missing fails inside the run: neither the run
    directory nor the --weights-dir folders made for it are left."""
    config = json.load(open(dataset))
    config["files"] = {key: {**value, "path": "missing.h5"}
                       for key, value in config["files"].items()}
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(config))
    weights = tmp_path / "new" / "weights"
    assert train_cli.main(train_flags(str(broken), weights, "x")) == 2
    one_error_line(capsys, "missing.h5")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("tool,flags,expected", [
    ("evaluate", ["--refine", "2", "--refine-lr", "inf"], "--refine-lr"),
    ("evaluate", ["--name", "../../x"], "--name"),
    ("evaluate", ["--exported", "export/1", "-r", "2"], "-r applies"),
    ("evaluate", ["-r", "1000000"], "-r: expected an integer in 1..100"),
    ("export", ["-r", "1000000"], "-r: expected an integer in 1..100"),
    ("export", ["--version", "0"], "--version"),
    ("export", ["--tolerance", "nan"], "--tolerance"),
    ("export", ["--tolerance", "-1"], "--tolerance")])
def test_evaluate_and_export_flag_out_of_range_is_one_line(run, tmp_path, capsys,
                                                           tool, flags, expected):
    out = tmp_path / "out"
    if tool == "evaluate":
        code = evaluate_cli.main(["-c", run, "--out", str(out), "--no-progress",
                                  *flags])
    else:
        code = export_cli.main(["-c", run, "--out", str(out), "--tflite", "none", *flags])
    assert code == 2
    one_error_line(capsys, expected, "expected")
    assert not out.exists() and not (tmp_path / "x.json").exists()


def test_refine_lr_out_of_range_is_refused_even_without_steps(run, tmp_path, capsys):
    out = tmp_path / "out"
    assert evaluate_cli.main(["-c", run, "--out", str(out), "--no-progress",
                              "--refine-lr", "0"]) == 2
    one_error_line(capsys, "--refine-lr", "expected a finite step size > 0")
    assert not out.exists()


def test_evaluation_that_fails_leaves_no_output_folder(run, tmp_path, capsys):
    os.remove(runs.weights_path(run))
    out = tmp_path / "reports"
    assert evaluate_cli.main(["-c", run, "--out", str(out), "--no-progress"]) == 2
    one_error_line(capsys, run, "no model.weights.h5")
    assert not out.exists()


@pytest.mark.parametrize("size", ["0", "-16", "24"])
def test_report_size_out_of_range_is_one_line(capsys, size):
    from aldk_tf.cli import report as report_cli
    assert report_cli.main(["--size", size]) == 2
    one_error_line(capsys, "--size", "multiple of 16", size)


def nifti(path, data, affine=None):
    import nibabel as nib
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 1.5, 1]) if affine is None
                             else affine), str(path))
    return str(path)


def test_non_integer_labels_are_refused_not_rounded(tmp_path, capsys):
    """A float label map (0.5, 1.5 ...) would be rounded into other labels silently."""
    from aldk_tf.cli import warp as warp_cli
    rng = np.random.default_rng(0)
    flow = np.zeros((SIZE,) * 3 + (1, 3), np.float32)
    flow_path = nifti(tmp_path / "flow.nii.gz", flow)
    labels = nifti(tmp_path / "labels.nii.gz",
                   rng.integers(0, 3, (SIZE,) * 3).astype(np.float32) + 0.5)
    out = tmp_path / "warped.nii.gz"
    assert warp_cli.main(["--flow", flow_path, "--image", labels, "--out", str(out),
                      "--interpolation", "labels", "--flow-space", "ras"]) == 2
    one_error_line(capsys, labels, "not integer labels", "expected")
    assert not out.exists()


def test_errors_about_a_loaded_scan_name_its_file(tmp_path):
    from aldk_tf.data import DataError
    from aldk_tf.data.preprocess import load_image, preprocess_scan
    path = nifti(tmp_path / "blank.nii.gz", np.zeros((SIZE,) * 3, np.float32))
    with pytest.raises(DataError, match="blank.nii.gz"):
        preprocess_scan(load_image(path), size=SIZE)


def test_data_preparation_never_overwrites_a_dataset(tmp_path, capsys):
    from aldk_tf.cli import nifti_to_h5
    rng = np.random.default_rng(0)
    images = [nifti(tmp_path / f"s{i}.nii.gz", rng.random((12,) * 3).astype(np.float32))
              for i in range(4)]
    out = tmp_path / "set"
    (tmp_path / "set.h5").write_text("an earlier dataset")
    flags = ["--images", *images, "--out", str(out), "--size", "16", "--val", "2"]
    assert nifti_to_h5.main(flags) == 2
    one_error_line(capsys, "set.h5", "exists", "--overwrite")
    assert (tmp_path / "set.h5").read_text() == "an earlier dataset"
    assert not (tmp_path / "set.json").exists()
    assert nifti_to_h5.main([*flags, "--overwrite"]) == 0
    assert h5py.is_hdf5(tmp_path / "set.h5")
    capsys.readouterr()
    for bad in (["--threshold", "nan"], ["--window", "300", "inf"]):
        assert nifti_to_h5.main([*flags[:-4], "--out", str(tmp_path / "other"), "--size",
                                 "16", "--val", "2", *bad]) == 2
        one_error_line(capsys, bad[0].lstrip("-"), "finite")
    assert not (tmp_path / "other.h5").exists()
    new = tmp_path / "new" / "set"                   # a failed run leaves no folder
    assert nifti_to_h5.main([*flags[:-4], "--out", str(new), "--seed", "-1"]) == 2
    one_error_line(capsys, "--seed")
    assert not new.parent.exists()


def test_build_demo_faults_are_one_line(tmp_path, capsys):
    from aldk_tf.cli import build_demo
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cases = [(["--seed", "-1"], "--seed"),
             (["--heldout-t1", str(tmp_path / "missing.nii.gz")], "missing.nii.gz"),
             (["--out", str(blocker)], str(blocker)),
             (["--nifti", str(blocker)], f"--nifti {blocker}")]
    for flags, expected in cases:
        assert build_demo.main(["--out", str(tmp_path / "demo"), "--size", "16", *flags]) == 2
        one_error_line(capsys, expected)
    assert not (tmp_path / "demo").exists() and blocker.read_text() == "x"


def test_truncated_tflite_is_one_line_not_a_crash(tmp_path):
    """tf.lite.Interpreter does not verify a model: a cut file crashed the process
    (segfault); the flatbuffer is checked first. In a subprocess: a crash is the fault."""
    weights = tf.Variable(tf.random.normal([64, 64]))

    @tf.function(input_signature=[tf.TensorSpec([1, 64], tf.float32)])
    def model(x):
        return {"y": tf.matmul(x, weights)}
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [model.get_concrete_function()], model)
    content = converter.convert()
    path = tmp_path / "model.tflite"
    path.write_bytes(content[:len(content) // 2])
    check = ("import sys\nfrom aldk_tf.deploy import serving\ntry:\n"
             "    serving.tflite_ops(sys.argv[1])\nexcept ValueError as error:\n"
             "    print(error)\n    sys.exit(2)\n")
    result = subprocess.run([sys.executable, "-c", check, str(path)], capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert result.returncode == 2, (result.returncode, result.stderr[-500:])
    assert "truncated" in result.stdout


@pytest.mark.parametrize("fault", ["nan", "no-intent"])
def test_flow_with_nan_or_unnamed_axes_is_one_line(tmp_path, capsys, fault):
    """A NaN in the flow was a TensorFlow traceback; a flow whose intent names no axes
    was read as RAS silently (an ITK/ANTs field is LPS)."""
    from aldk_tf.cli import warp as warp_cli
    flow = np.zeros((SIZE,) * 3 + (1, 3), np.float32)
    if fault == "nan":
        flow[1, 1, 1] = np.nan
    flow_path = nifti(tmp_path / "flow.nii.gz", flow)
    image = nifti(tmp_path / "image.nii.gz", np.ones((SIZE,) * 3, np.float32))
    out = tmp_path / "warped.nii.gz"
    flags = ["--flow-space", "ras"] if fault == "nan" else []
    assert warp_cli.main(["--flow", flow_path, "--image", image, "--out", str(out),
                      *flags]) == 2
    one_error_line(capsys, flow_path, "NaN" if fault == "nan" else "--flow-space")
    assert not out.exists()


def test_a_full_disk_during_a_checkpoint_save_is_one_line_and_keeps_the_last_one(
        run, capsys, monkeypatch):
    """What TensorFlow raises when the disk fills during SaveV2 (seen on a 2 MB tmpfs):
    the half-written ``ckpt-N_temp/`` is removed and the previous checkpoint resumes."""
    def full_disk(manager, checkpoint_number=None, **_):
        os.makedirs(os.path.join(manager.directory, f"ckpt-{checkpoint_number}_temp"))
        raise tf.errors.ResourceExhaustedError(
            None, None, "{{function_node __wrapped__SaveV2}} /x/ckpt_temp/part-0.tempstate1;"
                        " No space left on device [Op:SaveV2]")
    monkeypatch.setattr(tf.train.CheckpointManager, "save", full_disk)
    assert train_cli.main(["-c", run, "--max_steps", "6"]) == 2
    one_error_line(capsys, os.path.join(run, "checkpoints"), "step 6",
                   "(No space left on device)", "ckpt-4 is intact")
    assert not [n for n in os.listdir(os.path.join(run, "checkpoints")) if "_temp" in n]
    monkeypatch.undo()
    assert train_cli.main(["-c", run, "--max_steps", "6"]) == 0
    assert latest_step(run) == 6


def test_a_full_disk_while_writing_the_config_names_it_and_keeps_it(tmp_path, monkeypatch):
    from aldk_tf.config import atomic_write_text
    path = tmp_path / "config.json"
    path.write_text("old")

    def no_space(*_):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(OSError) as raised:
        atomic_write_text(str(path), "new")
    assert str(raised.value) == (f"{path}: cannot write (No space left on device); it is "
                                 "as it was")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["config.json"]


EXTRACT_SLOWLY = """
import sys, time
from aldk_tf.cli import teacher_flows as cli
from aldk_tf.training import teacher_flows
write = teacher_flows.write_flow
def write_slowly(*args, **kwargs):      # time for the test to kill between two pairs
    write(*args, **kwargs)
    time.sleep(0.5)
teacher_flows.write_flow = write_slowly
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_9_during_teacher_flow_extraction_then_rerun_gives_every_flow(
        run, tmp_path, capsys):
    from aldk_tf.cli import teacher_flows
    from aldk_tf.training.flow_store import flows_path, pair_key, stored_keys
    path = flows_path(run)
    process = subprocess.Popen(
        [sys.executable, "-c", EXTRACT_SLOWLY, "-c", run, "--batch", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"})
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            assert process.poll() is None, "the extraction ended before the kill"
            if len(_keys_while_written(path)) >= 2:
                break
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    pairs = list_pairs(load_dataset_config(runs.load_run_config(run).dataset), "1")
    assert len(stored_keys(path)) < len(pairs)        # killed part-way
    assert teacher_flows.main(["-c", run, "--batch", "1"]) == 0
    assert stored_keys(path) == {pair_key(*p) for p in pairs}
    # The same flows as an extraction that was never interrupted.
    shutil.copytree(run, str(tmp_path / "clean_run"))
    assert teacher_flows.main(["-c", str(tmp_path / "clean_run"), "--batch", "1"]) == 0
    clean = flows_path(str(tmp_path / "clean_run"))
    with h5py.File(path, "r") as resumed, h5py.File(clean, "r") as fresh:
        for pair in pairs:
            key = pair_key(*pair)
            np.testing.assert_allclose(np.asarray(resumed[key]), np.asarray(fresh[key]),
                                       atol=1e-3)


def _keys_while_written(path):
    """Flows (datasets) in a file another process is writing (HDF5's lock bypassed: the
    library's readers would rightly refuse a file in use)."""
    found = set()
    try:
        with h5py.File(path, "r", locking=False) as handle:
            handle.visititems(lambda name, node: found.add(name)
                              if isinstance(node, h5py.Dataset) else None)
            return found
    except (OSError, KeyError, RuntimeError):      # not there yet, or mid-write
        return set()
