"""The shipped pretrained 64³ brain-MR student: it loads, says what it is, and registers
unseen synthetic brains better than no registration."""

import json
from pathlib import Path

import numpy as np
import pytest

import aldk_tf
from aldk_tf import metrics
from aldk_tf.deploy import serving

PRETRAINED = Path(aldk_tf.__file__).parent / "pretrained" / "brain_mr_64"
VERSION = PRETRAINED / "1"


def test_shipped_model_describes_itself():
    info = json.loads((VERSION / "export_info.json").read_text())
    assert info["image_size"] == [64, 64, 64]
    assert info["model"].startswith("student")
    assert "ICBM 2009a" in info["trained_on"]
    test = info["heldout_test"]
    assert test[info["model"]]["dice"] > test["before"]["dice"]
    assert "bench/long_train.py" in info["command"]
    # register reproduces the training data's preparation; no machine paths anywhere
    assert info["preprocessing"]["crop"] == "nonzero" and info["preprocessing"]["margin"] == 8
    assert info["preprocessing"]["intensity"] == "max"
    text = (VERSION / "export_info.json").read_text()
    assert not any(root in text for root in ("/work/", "/tmp/", "/home/", "/root/"))
    size = sum(p.stat().st_size for p in PRETRAINED.rglob("*") if p.is_file())
    assert size < 30e6                                  # a few MB, not a checkpoint dump


@pytest.fixture(scope="module")
def unseen_pairs():
    """Four brains of varied anatomy the model never saw (another seed than the study)."""
    from aldk_tf.data.demo_set import load_template, make_subject
    template = load_template(64)
    subjects = [make_subject(template, seed=1234, index=i, vary=True) for i in range(4)]
    return [(subjects[i], subjects[j]) for i, j in ((0, 1), (2, 3), (1, 2))]


def test_shipped_model_registers_unseen_brains(unseen_pairs):
    runner = serving.savedmodel_runner(str(VERSION))
    assert tuple(runner.image_size) == (64, 64, 64)
    before, after = [], []
    for fixed, moving in unseen_pairs:
        images = [s["volume"][None, ..., None].astype(np.float32) / 255.0
                  for s in (fixed, moving)]
        flow = np.asarray(runner(*images)["flow"])
        assert flow.shape == (1, 64, 64, 64, 3) and np.all(np.isfinite(flow))
        segs = [s["segmentation"][None, ..., None] for s in (fixed, moving)]
        zero = np.zeros_like(flow)
        before.append(metrics.pair_metrics(*segs, zero, [1, 2, 3])["dice"][0])
        result = metrics.pair_metrics(*segs, flow, [1, 2, 3])
        after.append(result["dice"][0])
        assert result["folding_percent"][0] < 1.0
    assert np.mean(after) > np.mean(before) + 0.02, (before, after)


def test_the_recorded_settings_rebuild_the_shipped_model(unseen_pairs):
    """export_info.json keeps the run's settings as trained: they build the model that,
    given the SavedModel's weights, gives the SavedModel's flow."""
    from aldk_tf.config import RunConfig
    recorded = json.loads((VERSION / "export_info.json").read_text())["training"]
    config = RunConfig.from_dict(recorded["run_config"])
    assert config.model.student_variant == "paper"
    runner = serving.savedmodel_runner(str(VERSION))
    model = config.model.build()
    model.set_weights([variable.numpy() for variable in runner.loaded.model_variables])
    fixed, moving = (s["volume"][None, ..., None].astype(np.float32) / 255.0
                     for s in unseen_pairs[0])
    flow = runner(fixed, moving)["flow"]
    assert np.abs(flow).max() > 1.0                     # a real deformation, not zeros
    np.testing.assert_allclose(model({"fixed": fixed, "moving": moving})["flow"], flow,
                               atol=1e-4)
