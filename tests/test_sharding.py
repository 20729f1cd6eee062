"""Sharded evaluation (evaluate.py --shard/--merge) and sharded teacher-flow extraction
(python -m aldk_tf.cli.teacher_flows --shard/--merge): merged parts equal the unsharded run."""

import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from aldk_tf.cli import teacher_flows as teacher_flows_cli
from aldk_tf.training import flow_store, runs
from aldk_tf.training.checkpoints import save_weights_atomic
from aldk_tf.config import ModelConfig, RunConfig
from aldk_tf.shards import Shard, ShardError
from synthetic import write_blob_dataset
from scripts import load_cli

ROOT = Path(__file__).resolve().parents[1]
SIZE = (16, 16, 16)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """16^3 blobs: 3 training scans (6 pairs), 2 validation scans (2 pairs)."""
    return write_blob_dataset(str(tmp_path_factory.mktemp("blobs16")), size=16, train=3)


@pytest.fixture(scope="module")
def student_run(tmp_path_factory, dataset):
    """An untrained student with weights perturbed enough to move voxels."""
    run_dir = str(tmp_path_factory.mktemp("weights") / "student16")
    config = RunConfig(dataset=dataset, model=ModelConfig(image_size=SIZE))
    model = config.model.build()
    noise = np.random.default_rng(0)
    model.set_weights([w + noise.normal(0, 0.05, w.shape).astype(w.dtype)
                       for w in model.get_weights()])
    config.save(run_dir)
    model.save_weights(runs.weights_path(run_dir))
    return run_dir


@pytest.mark.parametrize("text, expected", [("2/3", Shard(2, 3)), (" 1 / 1 ", Shard(1, 1))])
def test_shard_parse_and_select(text, expected):
    shard = Shard.parse(text)
    assert shard == expected
    items = list(range(7))
    parts = [Shard(i, 3).select(items) for i in (1, 2, 3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert [list(Shard(i, 3).positions(7)) for i in (1, 2, 3)] == parts
    assert shard.name("report", ".txt") == f"report.shard-{shard.index}-of-{shard.count}.txt"


@pytest.mark.parametrize("text", ["0/3", "4/3", "3", "a/b", "1/0", "-1/2"])
def test_bad_shard_values_are_one_line_errors(text):
    with pytest.raises(ShardError, match="--shard") as error:
        Shard.parse(text)
    assert "\n" not in str(error.value)


def without_timing(document):
    """A JSON report without the wall-clock seconds (which differ from run to run)."""
    document = json.loads(json.dumps(document))
    document["summary"].pop("seconds")
    for record in document["pairs"]:
        record.pop("seconds")
    return document


def test_sharded_evaluation_merges_to_the_unsharded_report(student_run, tmp_path,
                                                           capsys):
    cli = load_cli("evaluate")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    # "train": 6 pairs in 3 shards of 2; "validation": 2 pairs, so shard 3/3 is empty.
    common = ["-c", student_run, "-v", "train,validation", "--no-progress"]
    assert cli.main(common + ["--out", str(whole)]) == 0, capsys.readouterr().err
    for index in (1, 2, 3):
        assert cli.main(common + ["--out", str(parts), "--shard", f"{index}/3"]) == 0
    part = json.loads((parts / "student16-train.shard-2-of-3.json").read_text())
    # Pairs (0,1) (0,2) (1,0) (1,2) (2,0) (2,1): shard 2/3 holds the 2nd and the 5th.
    assert [(r["fixed_id"], r["moving_id"]) for r in part["pairs"]] == [
        ("blobs/train00", "blobs/train02"), ("blobs/train02", "blobs/train00")]
    assert part["shard"] == {"index": 2, "count": 3, "pairs": 6}
    assert json.loads((parts / "student16-validation.shard-3-of-3.json").read_text()
                      )["pairs"] == []

    # Merge by report name (-c/-v) for both subsets ...
    assert cli.main(common + ["--out", str(parts), "--merge"]) == 0, \
        capsys.readouterr().err
    for subset, count in (("train", 6), ("validation", 2)):
        merged = (parts / f"student16-{subset}.txt").read_text().splitlines()
        unsharded = (whole / f"student16-{subset}.txt").read_text().splitlines()
        assert merged == unsharded and len(merged) == count + 5
        assert without_timing(json.loads((parts / f"student16-{subset}.json").read_text())) \
            == without_timing(json.loads((whole / f"student16-{subset}.json").read_text()))
    # ... or from the part files alone, in any order, on another machine.
    elsewhere = tmp_path / "elsewhere"
    named = sorted(str(p) for p in parts.glob("student16-train.shard-*-of-3.json"))[::-1]
    assert cli.main(["--merge", *named, "--out", str(elsewhere)]) == 0
    assert (elsewhere / "student16-train.txt").read_text() == \
        (whole / "student16-train.txt").read_text()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["student16-train.csv",
                                                           "student16-train.json",
                                                           "student16-train.txt"]


@pytest.mark.parametrize("case, expected", [
    ("missing_part", "missing 2/3"),
    ("bad_shard", "need 1 <= i <= n"),
    ("not_a_part", "not a shard part"),
    ("no_run", "-c/--checkpoint is required"),
])
def test_sharding_errors_are_one_line(case, expected, student_run, tmp_path, capsys):
    cli = load_cli("evaluate")
    out = tmp_path / "out"
    common = ["-c", student_run, "-v", "validation", "--no-progress", "--out", str(out)]
    if case == "missing_part":
        for index in (1, 3):
            assert cli.main(common + ["--shard", f"{index}/3"]) == 0
        capsys.readouterr()
        args = common + ["--merge"]
    elif case == "bad_shard":
        args = common + ["--shard", "4/3"]
    elif case == "not_a_part":
        stray = tmp_path / "report.json"
        stray.write_text("{}")
        args = ["--merge", str(stray), "--out", str(out)]
    else:
        args = ["-v", "validation"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not (out / "student16-validation.txt").exists()


def make_teacher_run(folder, dataset):
    config = RunConfig(dataset=dataset, model=ModelConfig(
        role="teacher", base="vtn", affine="vtn", image_size=SIZE))
    config.save(str(folder))
    save_weights_atomic(config.model.build(), str(folder))
    return str(folder)


def read_flows(path):
    with h5py.File(path, "r") as handle:
        keys = sorted(flow_store._complete_keys(handle))
        return {key: handle[key][()] for key in keys}


def test_sharded_teacher_flow_extraction_merges_to_the_unsharded_file(dataset, tmp_path,
                                                                       capsys):
    whole = make_teacher_run(tmp_path / "whole", dataset)
    sharded = str(tmp_path / "sharded")
    shutil.copytree(whole, sharded)
    assert teacher_flows_cli.main(["-c", whole]) == 0, capsys.readouterr().err
    for index in (3, 1, 2):
        assert teacher_flows_cli.main(["-c", sharded, "--shard", f"{index}/3"]) == 0
    assert len(read_flows(os.path.join(sharded, "teacher_flows.shard-1-of-3.h5"))) == 2
    capsys.readouterr()

    # An incomplete set of parts is refused and leaves the parts in place.
    os.rename(os.path.join(sharded, "teacher_flows.shard-2-of-3.h5"),
              os.path.join(tmp_path, "held-back.h5"))
    assert teacher_flows_cli.main(["-c", sharded, "--merge"]) == 2
    assert "missing 2/3" in capsys.readouterr().err
    os.rename(os.path.join(tmp_path, "held-back.h5"),
              os.path.join(sharded, "teacher_flows.shard-2-of-3.h5"))

    assert teacher_flows_cli.main(["-c", sharded, "--merge"]) == 0, \
        capsys.readouterr().err
    expected, merged = (read_flows(os.path.join(run, "teacher_flows.h5"))
                        for run in (whole, sharded))
    assert list(merged) == list(expected) and len(merged) == 6
    for key in expected:
        np.testing.assert_array_equal(merged[key], expected[key])
    assert sorted(os.listdir(sharded)) == sorted(os.listdir(whole))   # parts removed
