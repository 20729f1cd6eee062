"""Preprocessing travels with the model: aldk-prep's settings reach register via the run
config and export_info.json, and register refuses what it cannot prepare the same way."""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from aldk_tf.cli import register as register_cli
from aldk_tf.deploy import preparation
from aldk_tf.deploy import register

from aldk_tf.training import runs
from aldk_tf.cli import export as export_cli
from aldk_tf.cli import nifti_to_h5
from aldk_tf.cli import train as train_cli
from aldk_tf.data import load_dataset_config
from aldk_tf.data.preprocess import PreprocessSettings, preprocess_scan

SIZE = 32
WINDOW = (-1000.0, 400.0)                     # not the default CT window (-200, 300)
AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])


def ct_scan(rng, shift=(0, 0, 0)):
    """A CT-like volume in HU: air, a body with a lung (-700 HU) and soft tissue."""
    grid = np.indices((36, 36, 30), dtype=np.float32).transpose(1, 2, 3, 0)
    centre = np.array([18.0, 18.0, 15.0]) + np.asarray(shift)
    body = (((grid - centre) / [13.0, 11.0, 11.0]) ** 2).sum(-1) < 1
    lung = (((grid - centre - [4, 0, 0]) / [5.0, 4.0, 5.0]) ** 2).sum(-1) < 1
    data = np.full(body.shape, -1000.0, np.float32)
    data[body] = 40.0 + rng.normal(0, 10, body.sum())
    data[lung] = -700.0 + rng.normal(0, 20, lung.sum())
    return data


@pytest.fixture(scope="module")
def ct_model(tmp_path_factory):
    """A CT dataset prepared with window -1000..400, a (random) student run on it, and
    its export; plus a held-out NIfTI pair."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("ct")
    (folder / "images").mkdir()
    for index in range(3):
        nib.save(nib.Nifti1Image(ct_scan(rng, (index, -index, 0)), AFFINE),
                 folder / "images" / f"ct{index}.nii.gz")
    assert nifti_to_h5.main(["--images", str(folder / "images"), "--out",
                             str(folder / "ct"), "--size", str(SIZE), "--modality", "ct",
                             "--window", *map(str, WINDOW)]) == 0
    args = train_cli.parse_args(["-b", "LDR", "-d", str(folder / "ct.json"),
                                 "--output", "ct_student"])
    config = train_cli.build_config(args)
    run_dir = str(folder / "weights" / "ct_student")
    model = config.model.build()
    noise = np.random.default_rng(0)
    model.set_weights([w + noise.normal(0, 0.05, w.shape).astype(w.dtype)
                       for w in model.get_weights()])
    config.save(run_dir)
    model.save_weights(runs.weights_path(run_dir))
    assert export_cli.main(["-c", run_dir, "--out", str(folder / "export"),
                            "--tflite", "none"]) == 0
    pair = {}
    for name, shift in (("fixed", (1, 1, 0)), ("moving", (-1, 2, 1))):
        pair[name] = str(folder / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(ct_scan(rng, shift), AFFINE), pair[name])
    return {"folder": folder, "run": run_dir, "model": str(folder / "export" / "1"),
            "pair": pair}


def test_settings_travel_from_the_dataset_to_the_export(ct_model):
    folder = ct_model["folder"]
    dataset = load_dataset_config(folder / "ct.json")
    assert dataset.preprocessing.window == WINDOW
    assert dataset.preprocessing.modality == "ct"
    assert runs.load_run_config(ct_model["run"]).preprocessing == \
        dataset.preprocessing.to_dict()
    with open(os.path.join(ct_model["model"], "export_info.json")) as handle:
        info = json.load(handle)
    assert PreprocessSettings.from_dict(info["preprocessing"]) == dataset.preprocessing
    assert info["dataset"] == os.path.abspath(folder / "ct.json")   # for evaluate.py


def test_register_uses_the_models_window_without_any_flag(ct_model, tmp_path, capsys,
                                                          monkeypatch):
    prepared = []
    original = preprocess_scan

    def recording(*args, **kwargs):
        prepared.append(original(*args, **kwargs))
        return prepared[-1]
    monkeypatch.setattr(register.preprocess, "preprocess_scan", recording)
    pair, out_dir = ct_model["pair"], tmp_path / "out"
    assert register_cli.main(["--model", ct_model["model"], "--fixed", pair["fixed"],
                              "--moving", pair["moving"], "--out", str(out_dir)]) == 0
    assert "window -1000..400 HU" in capsys.readouterr().out
    with open(out_dir / "registration.json") as handle:
        used = json.load(handle)["preprocessing"]
    assert used["window"] == list(WINDOW) and used["modality"] == "ct"
    # The model's inputs are aldk-prep's preprocessing with that window, not the default.
    assert len(prepared) == 2
    for scan, path in zip(prepared, (pair["fixed"], pair["moving"])):
        expected = original(path, size=SIZE, modality="ct", window=WINDOW)
        default = original(path, size=SIZE, modality="ct")
        np.testing.assert_array_equal(scan.volume, expected.volume)
        assert not np.array_equal(scan.volume, default.volume)


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_a_mismatched_modality_fails_with_one_line(ct_model, tmp_path, capsys):
    pair = ct_model["pair"]
    code = register_cli.main(["--model", ct_model["model"], "--fixed", pair["fixed"],
                              "--moving", pair["moving"], "--out", str(tmp_path / "out"),
                              "--modality", "mr"])
    assert code == 2
    assert "trained on CT scans" in _one_line_error(capsys)
    assert os.listdir(tmp_path) == []


def test_a_scan_outside_the_window_is_refused(ct_model, tmp_path, capsys):
    """An MR-like scan (all values far above 400 'HU') maps to 255 everywhere."""
    mr_like = str(tmp_path / "mr.nii.gz")
    nib.save(nib.Nifti1Image(np.full((20, 20, 20), 900.0, np.float32) +
                             np.indices((20, 20, 20)).sum(0), AFFINE), mr_like)
    code = register_cli.main(["--model", ct_model["model"], "--fixed", ct_model["pair"]["fixed"],
                              "--moving", mr_like, "--out", str(tmp_path / "out")])
    assert code == 2
    line = _one_line_error(capsys)
    assert mr_like in line and "every voxel maps to 255" in line
    assert os.listdir(tmp_path) == ["mr.nii.gz"]


@pytest.mark.parametrize("recorded, flags, masks, expected", [
    ({"modality": "mr", "used_masks": True}, {}, False, "pass --fixed-mask"),
    ({"modality": "mr", "crop": "mask"}, {}, False, "pass --fixed-mask"),
    ({"modality": "mr"}, {}, True, "drop --fixed-mask"),
    ({"modality": "ct", "crop": "label"}, {}, False, "crop label"),
    ({"modality": "ct"}, {"modality": "mr"}, False, "trained on CT"),
    ({"modality": "mr"}, {"window": (5.0, 1.0)}, False, "--window"),
])
def test_requests_the_model_contradicts_are_refused(recorded, flags, masks, expected):
    info = {"preprocessing": PreprocessSettings(size=SIZE, **recorded).to_dict()}
    with pytest.raises(register.RegisterError, match=expected.replace("-", r"\-")):
        settings, _ = preparation.resolve_preprocessing(info, (SIZE,) * 3, flags, masks)
        preparation.scan_crop(settings, "crop" in flags, masks)


def test_flags_override_single_settings_with_a_note():
    info = {"preprocessing": PreprocessSettings(size=SIZE, modality="ct",
                                                window=WINDOW).to_dict()}
    settings, notes = preparation.resolve_preprocessing(info, (SIZE,) * 3,
                                                     {"window": (-200.0, 300.0)})
    assert settings.window == (-200.0, 300.0) and settings.modality == "ct"
    assert notes == ["--window -200 300 overrides the model's -1000 400"]
    assert preparation.scan_crop(settings, False, False) == "threshold"
    settings, _ = preparation.resolve_preprocessing(info, (SIZE,) * 3, {"crop": "none"})
    assert preparation.scan_crop(settings, True, False) == "none"


def test_masks_prepare_scans_like_the_data_preparation(tmp_path):
    """A model trained on masked MR scans: register crops and normalises inside the masks
    exactly as aldk-prep did (same PreprocessedScan)."""
    rng = np.random.default_rng(1)
    data = rng.uniform(10, 200, (30, 30, 30)).astype(np.float32)
    mask = np.zeros(data.shape, np.uint8)
    mask[5:22, 8:25, 6:20] = 1
    image, mask_image = (nib.Nifti1Image(data, AFFINE), nib.Nifti1Image(mask, AFFINE))
    prepared = PreprocessSettings(size=16, modality="mr", used_masks=True)
    expected = preprocess_scan(image, mask=mask_image, **prepared.scan_arguments())
    registrar = object.__new__(register.Registrar)      # no model needed to prepare
    settings, _ = preparation.resolve_preprocessing(
        {"preprocessing": prepared.to_dict()}, (16,) * 3, {}, with_masks=True)
    registrar.settings = settings
    registrar.with_masks = True
    _, scan = registrar.prepare(image, mask_image)
    np.testing.assert_array_equal(scan.volume, expected.volume)
    np.testing.assert_array_equal(scan.crop_start, [3, 6, 4])   # mask box - margin 2


# ----------------------------------------------------------------------------- recorded
def test_a_model_without_recorded_preprocessing_is_refused_naming_the_flags(
        savedmodel_32_unrecorded, demo_dataset_32, tmp_path, capsys):
    """No guess: one line naming every flag to give; with them it registers."""
    from demo_nifti import demo_scans, save_nifti
    scans = demo_scans(demo_dataset_32)
    paths = [save_nifti(tmp_path / f"{s}.nii.gz", scans[s]["volume"],
                        scans[s]["attrs"]["affine"]) for s in ("subject_04", "subject_05")]
    arguments = ["--model", savedmodel_32_unrecorded, "--fixed", paths[0], "--moving",
                 paths[1], "--out", str(tmp_path / "out"), "--crop", "none"]
    assert register_cli.main(arguments) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "records no preprocessing" in err[0], err
    for flag in ("--modality", "--margin", "--intensity"):
        assert flag in err[0]
    assert "--crop," not in err[0]                    # given: not asked for
    assert not (tmp_path / "out").exists()
    assert register_cli.main([*arguments, "--modality", "mr", "--margin", "0",
                              "--intensity", "max"]) == 0


def test_the_demo_builder_records_a_preparation_register_reproduces(demo_dataset_32):
    """The demo's template prepared by register's settings is the demo's template,
    voxel for voxel: same crop box (non-zero + 8), same 0..max scaling, same size."""
    from nilearn.datasets import load_mni152_template

    from aldk_tf.data import demo_set
    recorded = load_dataset_config(demo_dataset_32).preprocessing
    assert recorded == demo_set.preprocessing(32)
    assert (recorded.crop, recorded.margin, recorded.intensity) == ("nonzero", 8, "max")
    template = demo_set.load_template(32)
    scan = preprocess_scan(load_mni152_template(), **recorded.scan_arguments())
    expected = np.rint(np.clip(template["t1"], 0.0, 1.0) * 255.0)
    assert np.abs(scan.volume.astype(np.float64) - expected).max() <= 1
    np.testing.assert_allclose(scan.affine, template["affine"], atol=1e-6)


def test_the_shipped_model_records_the_demo_preparation():
    import aldk_tf
    path = os.path.join(os.path.dirname(aldk_tf.__file__), "pretrained", "brain_mr_64", "1",
                        "export_info.json")
    with open(path) as handle:
        block = json.load(handle)["preprocessing"]
    from aldk_tf.data import demo_set
    assert PreprocessSettings.from_dict(block) == demo_set.preprocessing(64)
    assert "/" not in json.dumps(block)                # no machine paths
