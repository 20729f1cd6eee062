"""Training under tf.distribute (aldk_tf/training/distribute.py, train_run.train with a strategy).

MirroredStrategy over two logical CPU devices follows the one-device run step for step
(plain student and ALDK, same global batch and seed), and its checkpoint continues
without a strategy; two worker processes on loopback train ALDK under
MultiWorkerMirroredStrategy. Each runs in fresh processes (devices and the collective
runtime can only be set up before TensorFlow starts), bounded by timeouts.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from aldk_tf.training import distribute
from synthetic import write_blob_dataset
from scripts import load_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
HELPER = os.path.join(ROOT, "tests", "distribute_helper.py")
TIMEOUT = 300
STUDENT_KEYS = ("loss", "similarity", "smoothness", "det", "ortho")
ALDK_KEYS = ("loss", "rec", "dis", "critic", "gp", "adversarial", "similarity",
             "smoothness")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """16^3 blobs, 3 training scans (6 pairs)."""
    return write_blob_dataset(str(tmp_path_factory.mktemp("blobs16")), size=16, train=3)


def environment(**extra):
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **extra}


def assert_same_trajectory(distributed, single, keys, label):
    for key in keys:
        steps = len(distributed[key])
        np.testing.assert_allclose(distributed[key], single[key][:steps], rtol=1e-5,
                                   atol=1e-7, err_msg=f"{label}: {key}")


@pytest.mark.slow
def test_mirrored_training_matches_one_device(dataset, tmp_path):
    result = subprocess.run([sys.executable, HELPER, dataset, str(tmp_path)],
                            capture_output=True, text=True, timeout=TIMEOUT,
                            env=environment())
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads(result.stdout.strip().splitlines()[-1])
    student, aldk = runs["student"], runs["aldk"]
    assert len(student["mirrored"]["loss"]) == len(student["single"]["loss"]) == 3
    assert_same_trajectory(student["mirrored"], student["single"], STUDENT_KEYS,
                           "student, mirrored")
    # Steps 0 and 2 are adversarial with a critic update, step 1 neither: both traced
    # cases of the ALDK step ran under the strategy.
    assert aldk["mirrored"]["adversarial"] == [1.0, 0.0, 1.0]
    assert_same_trajectory(aldk["mirrored"], aldk["single"], ALDK_KEYS, "ALDK, mirrored")
    # The mirrored run's checkpoint (student, critic, both optimizers) continued on one
    # device takes exactly the single run's next step.
    resumed = {key: aldk["single"][key][3:] for key in ALDK_KEYS}
    assert_same_trajectory(aldk["resumed"], resumed, ALDK_KEYS, "ALDK, resumed")
    assert runs["student weights max difference"] < 1e-5
    assert runs["aldk weights max difference"] < 1e-5


def make_teacher_run(folder, dataset):
    from aldk_tf.training.checkpoints import save_weights_atomic
    from aldk_tf.config import ModelConfig, RunConfig
    config = RunConfig(dataset=dataset, model=ModelConfig(
        role="teacher", base="vtn", affine="vtn", image_size=(16, 16, 16)))
    config.save(str(folder))
    save_weights_atomic(config.model.build(), str(folder))


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def load_train_cli():
    return load_cli("train")


@pytest.mark.slow
def test_multi_worker_aldk_on_loopback(dataset, tmp_path):
    """Two workers, one CPU replica each: the chief extracts the teacher flows while the
    other waits, three ALDK steps (global batch 2), one checkpoint, and the same weights
    as the same run on one device."""
    make_teacher_run(tmp_path / "teacher", dataset)
    shutil.copytree(tmp_path / "teacher", tmp_path / "teacher_reference")
    weights = tmp_path / "weights"

    def arguments(teacher):
        return ["-b", "LDR", "-d", dataset, "--aldk", "--teacher", str(teacher),
                "--batch", "2", "--round", "3", "--epochs", "1", "--adv-period", "2",
                "--critic-period", "2", "--checkpoint-every", "3", "--validate-every",
                "0", "--weights-dir", str(weights), "--verbose", "0",
                # float32: bfloat16 rounds a batch split over workers differently from
                # the whole batch on one device (5.8e-5 apart after 3 steps)
                "--precision", "float32"]

    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    workers, logs = [], []
    for index in range(2):
        tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        log = open(tmp_path / f"worker{index}.log", "w")
        logs.append(log)
        workers.append(subprocess.Popen(
            [sys.executable, TRAIN, *arguments(tmp_path / "teacher"), "--strategy",
             "multiworker", "--output", "multiworker"],
            env=environment(TF_CONFIG=json.dumps(tf_config)), stdout=log,
            stderr=subprocess.STDOUT))
    try:
        # Meanwhile, the reference: the same run on one device, in this process.
        from aldk_tf.training.run import train
        cli = load_train_cli()
        reference = str(weights / "one_device")
        train(cli.build_config(cli.parse_args(arguments(tmp_path / "teacher_reference"))),
              reference, verbose=0)
        deadline = time.time() + TIMEOUT
        codes = [worker.wait(timeout=max(deadline - time.time(), 1)) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        for log in logs:
            log.close()
    output = "\n".join((tmp_path / f"worker{i}.log").read_text()[-2000:] for i in range(2))
    assert codes == [0, 0], output
    run_dir = weights / "multiworker"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("ckpt-*.index")) == \
        ["ckpt-3.index"]
    assert (run_dir / "config.json").is_file() and (run_dir / "model.weights.h5").is_file()
    from aldk_tf.training import runs
    (_, distributed), (_, single) = runs.load_model(str(run_dir)), runs.load_model(reference)
    difference = max(float(np.abs(a - b).max())
                     for a, b in zip(distributed.get_weights(), single.get_weights()))
    assert difference < 1e-5, difference


@pytest.mark.parametrize("gpu, kind, replicas, expected", [
    ("0,x", "auto", 1, "expected GPU ids"),
    ("1,1", "auto", 1, "expected GPU ids"),
    ("0", "auto", 1, "no GPU"),
    (None, "ring", 1, "--strategy"),
    (None, "auto", 0, "--cpu-replicas must be >= 1"),
    (None, "multiworker", 2, "does not combine"),
])
def test_device_requests_fail_with_one_line(gpu, kind, replicas, expected, monkeypatch):
    if gpu == "0" and tf.config.list_physical_devices("GPU"):
        pytest.skip("this host has a GPU")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(distribute.StrategyError, match=expected) as error:
        distribute.make_strategy(gpu, kind, replicas)
    assert "\n" not in str(error.value)


def test_multiworker_needs_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(distribute.StrategyError, match="needs TF_CONFIG"):
        distribute.make_strategy(kind="multiworker")
    monkeypatch.setenv("TF_CONFIG", json.dumps(
        {"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 3}}))
    with pytest.raises(distribute.StrategyError, match="not in the cluster"):
        distribute.make_strategy(kind="multiworker")
