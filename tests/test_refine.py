"""aldk_tf/training/refine.py (instance optimisation) and its three users: the teacher-flow
extraction (``--refine``), evaluate.py ``--refine`` and ``python -m aldk_tf.cli.register
--refine``."""

import json
import os

import h5py
import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndimage
import tensorflow as tf

from aldk_tf import evaluation, losses, metrics, reports, spatial

from aldk_tf.cli import teacher_flows as teacher_flows_cli
from aldk_tf.training import flow_store, runs, teacher_flows
from aldk_tf.training.checkpoints import save_weights_atomic
from aldk_tf.config import ModelConfig, RunConfig
from aldk_tf.data import list_pairs, load_dataset_config, load_pair
from aldk_tf.data.preprocess import preprocess_scan
from aldk_tf.training.refine import objective, refine_flow
from aldk_tf.training.runs import RunError
from scripts import load_cli
from synthetic import write_blob_dataset
from test_register import nifti_pair, savedmodel  # noqa: F401  (fixtures)

SIZE = 16


def smooth_field(rng, channels, sigma, amplitude, size=SIZE):
    """``[1, S, S, S, channels]`` smoothed noise scaled to ``max |value| = amplitude``."""
    field = np.stack([ndimage.gaussian_filter(rng.normal(size=(size,) * 3), sigma)
                      for _ in range(channels)], axis=-1)
    return (amplitude * field / np.abs(field).max())[None].astype(np.float32)


def textured_image(rng, size=SIZE):
    """A smooth random texture in [0, 1], ``[1, S, S, S, 1]`` (edges everywhere)."""
    image = smooth_field(rng, 1, 1.0, 1.0, size)
    return (image - image.min()) / (image.max() - image.min())


@pytest.fixture(scope="module")
def known_pair():
    """(fixed, moving, true flow): ``fixed = warp(moving, true flow)`` exactly, so the
    true flow is a minimiser of the similarity term."""
    rng = np.random.default_rng(7)
    moving = textured_image(rng)
    true_flow = smooth_field(rng, 3, 3.0, 2.0)
    fixed = spatial.warp(moving, true_flow).numpy()
    return fixed, moving, true_flow


def interior(array):
    return array[:, 2:-2, 2:-2, 2:-2]


def test_refinement_lowers_the_objective(known_pair):
    fixed, moving, _ = known_pair
    zero = np.zeros((1, SIZE, SIZE, SIZE, 3), np.float32)
    flow, info = refine_flow(fixed, moving, zero, 20)
    initial, final = info["initial_loss"].numpy(), info["final_loss"].numpy()
    assert initial.shape == final.shape == (1,)
    assert final[0] < 0.5 * initial[0]
    recomputed = objective(tf.constant(fixed), tf.constant(moving), tf.constant(zero),
                           flow - zero)
    np.testing.assert_allclose(final, recomputed.numpy(), rtol=1e-4)
    assert initial[0] == pytest.approx(
        float(losses.similarity_loss(fixed, moving)[0]), rel=1e-5)


@pytest.mark.parametrize("start", ["zero", "perturbed"])
def test_refinement_recovers_a_known_flow(known_pair, start):
    fixed, moving, true_flow = known_pair
    if start == "zero":
        initial = np.zeros_like(true_flow)
    else:
        initial = true_flow + smooth_field(np.random.default_rng(3), 3, 2.0, 1.0)
    flow, _ = refine_flow(fixed, moving, initial, 40)
    flow = flow.numpy()

    def image_error(f):
        return float(np.abs(interior(spatial.warp(moving, f).numpy() - fixed)).mean())

    def flow_error(f):
        return float(np.linalg.norm(interior(f - true_flow), axis=-1).mean())

    assert image_error(flow) < 0.5 * image_error(initial)
    assert flow_error(flow) < 0.6 * flow_error(initial)


def test_zero_steps_return_the_initial_flow_exactly(known_pair):
    fixed, moving, true_flow = known_pair
    initial = true_flow + np.float32(0.3)
    flow, info = refine_flow(fixed, moving, initial, 0)
    np.testing.assert_array_equal(flow.numpy(), initial)
    np.testing.assert_array_equal(info["initial_loss"].numpy(), info["final_loss"].numpy())


def test_smoothness_sees_only_the_increment(known_pair):
    """An affine-like initial flow is not pulled back: with no similarity term the
    objective is zero at the start and refinement leaves the flow where it was."""
    fixed, moving, _ = known_pair
    ramp = spatial.affine_flow(0.05 * tf.eye(3)[None], tf.constant([[1.0, -2.0, 0.5]]),
                               (SIZE,) * 3).numpy()
    flow, info = refine_flow(fixed, moving, ramp, 10, similarity=0.0)
    assert float(info["initial_loss"][0]) == 0.0
    np.testing.assert_allclose(flow.numpy(), ramp, atol=1e-6)


def test_pairs_of_a_batch_are_refined_independently(known_pair):
    fixed, moving, true_flow = known_pair
    rng = np.random.default_rng(11)
    other_moving = textured_image(rng)
    other_fixed = spatial.warp(other_moving, smooth_field(rng, 3, 3.0, 2.0)).numpy()
    fixed_batch = np.concatenate([fixed, other_fixed])
    moving_batch = np.concatenate([moving, other_moving])
    initial = np.concatenate([0.5 * true_flow, np.zeros_like(true_flow)])
    batch_flow, batch_info = refine_flow(fixed_batch, moving_batch, initial, 15)
    for index in range(2):
        alone, info = refine_flow(fixed_batch[index:index + 1],
                                  moving_batch[index:index + 1],
                                  initial[index:index + 1], 15)
        # Equal up to float rounding (batched reductions sum in another order); after
        # many more steps that rounding can flip whether a border voxel's sample is
        # clamped, so a few border voxels may then drift apart by a fraction of a voxel.
        np.testing.assert_allclose(batch_flow.numpy()[index], alone.numpy()[0], atol=1e-4)
        assert float(batch_info["final_loss"][index]) == pytest.approx(
            float(info["final_loss"][0]), abs=1e-5)


@pytest.mark.parametrize("change, expected", [
    ({"fixed": np.zeros((1, SIZE, SIZE, SIZE), np.float32)}, "fixed_image: expected shape"),
    ({"moving": np.zeros((1, SIZE, SIZE, 8, 1), np.float32)}, "moving_image: expected"),
    ({"flow": np.zeros((1, SIZE, SIZE, SIZE, 2), np.float32)}, "initial_flow: expected"),
    ({"flow": np.zeros((2, SIZE, SIZE, SIZE, 3), np.float32)}, "initial_flow: expected"),
    ({"flow": np.full((1, SIZE, SIZE, SIZE, 3), np.nan, np.float32)}, "NaN or infinite"),
    ({"steps": -1}, "steps: expected an integer >= 0"),
    ({"steps": 2.5}, "steps: expected an integer >= 0"),
    ({"learning_rate": 0.0}, "learning_rate: expected"),
    ({"smoothness": -1.0}, "smoothness: expected"),
])
def test_invalid_inputs_raise_one_line_errors(known_pair, change, expected):
    fixed, moving, _ = known_pair
    arguments = {"fixed": fixed, "moving": moving,
                 "flow": np.zeros((1, SIZE, SIZE, SIZE, 3), np.float32), "steps": 1}
    arguments.update(change)
    options = {key: arguments.pop(key) for key in ("learning_rate", "smoothness")
               if key in arguments}
    with pytest.raises(ValueError) as error:
        refine_flow(arguments["fixed"], arguments["moving"], arguments["flow"],
                    arguments["steps"], **options)
    assert expected in str(error.value) and "\n" not in str(error.value)


# ----------------------------------------------------------------------------- extraction
@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    """16^3 blobs with segmentations: 3 training scans (6 pairs)."""
    return write_blob_dataset(str(tmp_path_factory.mktemp("blobs16")), size=SIZE, train=3)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, blobs):
    folder = str(tmp_path_factory.mktemp("weights") / "teacher16")
    config = RunConfig(dataset=blobs, model=ModelConfig(
        role="teacher", base="vtn", affine="vtn", image_size=(SIZE,) * 3))
    config.save(folder)
    save_weights_atomic(config.model.build(), folder)
    return folder


def test_extraction_stores_refined_flows_and_their_dice(teacher_run, blobs, tmp_path):
    _, teacher = runs.load_model(teacher_run)
    dataset = load_dataset_config(blobs)
    pairs = list_pairs(dataset, "1")[:3]
    path = str(tmp_path / "teacher_flows.h5")
    assert teacher_flows.extract_teacher_flows(teacher, dataset, pairs, path, 2,
                                               progress=False, refine=5) == 3
    with h5py.File(path, "r") as handle:
        assert handle.attrs["refine_steps"] == 5
        for fixed_id, moving_id in pairs:
            stored = handle[flow_store.pair_key(fixed_id, moving_id)]
            assert stored.dtype == np.float16 and stored.attrs["refine_steps"] == 5
            assert {"dice_teacher", "dice_stored"} <= set(stored.attrs)

    pair = load_pair(dataset, *pairs[2])
    inputs = {"fixed": pair["fixed"][None], "moving": pair["moving"][None]}
    raw = teacher.registration_model()(inputs)["flow"]
    expected, _ = refine_flow(inputs["fixed"], inputs["moving"], raw, 5)
    store = flow_store.TeacherFlowStore(path)
    assert store.setting["refine_steps"] == 5
    np.testing.assert_allclose(store.read(*pairs[2]), expected.numpy()[0], atol=2e-2)
    store.close()
    dice = {name: float(metrics.pair_metrics(pair["fixed_seg"][None],
                                             pair["moving_seg"][None], flow,
                                             dataset.label_values)["dice"][0])
            for name, flow in (("teacher", raw), ("stored", expected))}

    summary = flow_store.refinement_summary(path)
    assert summary["pairs"] == 3 and summary["refine_steps"] == 5
    assert summary["dice_stored"] > summary["dice_teacher"]
    with h5py.File(path, "r") as handle:
        attrs = handle[flow_store.pair_key(*pairs[2])].attrs
        assert attrs["dice_teacher"] == pytest.approx(dice["teacher"], abs=1e-6)
        assert attrs["dice_stored"] == pytest.approx(dice["stored"], abs=2e-3)

    # Another setting is refused, also when nothing is left to extract.
    for refine, learning_rate in ((0, 0.25), (5, 0.1), (7, 0.25)):
        with pytest.raises(RunError, match="flows stored with --refine 5"):
            teacher_flows.extract_teacher_flows(teacher, dataset, pairs, path,
                                                progress=False, refine=refine,
                                                refine_learning_rate=learning_rate)
    # The same setting resumes.
    assert teacher_flows.extract_teacher_flows(teacher, dataset, list_pairs(dataset, "1"),
                                               path, progress=False, refine=5) == 3


def test_extraction_cli_refine_reports_and_refuses_a_mismatch(teacher_run, capsys):
    assert teacher_flows_cli.main(["-c", teacher_run, "--refine", "10",
                                   "--refine-lr", "0.2"]) == 0, capsys.readouterr().err
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("6 flows extracted") for line in lines), lines
    report = json.loads(lines[-1])
    assert report["pairs"] == 6 and report["refine_steps"] == 10
    assert report["refine_learning_rate"] == pytest.approx(0.2)
    assert 0.0 < report["dice_teacher"] < report["dice_stored"] <= 1.0

    path = flow_store.flows_path(teacher_run, refine=10)
    assert os.path.exists(path) and not os.path.exists(flow_store.flows_path(teacher_run))
    # Another learning rate for the same step count would mix targets in one file.
    for args in (["--refine", "10"], ["--refine", "10", "--shard", "1/2"]):
        assert teacher_flows_cli.main(["-c", teacher_run, *args]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and "flows stored with --refine 10 --refine-lr 0.2" in \
            error[0], error
    # Raw flows of the same teacher go to their own file, beside the refined ones.
    assert teacher_flows_cli.main(["-c", teacher_run, "--refine", "0"]) == 0
    capsys.readouterr()
    raw = flow_store.flows_path(teacher_run)
    assert flow_store.TeacherFlowStore(raw).setting == {"refine_steps": 0}
    assert flow_store.TeacherFlowStore(path).setting["refine_steps"] == 10
    assert teacher_flows_cli.main(["-c", teacher_run, "--refine", "-1"]) == 2
    assert "--refine: expected an integer >= 0" in capsys.readouterr().err
    os.remove(path)
    os.remove(raw)


def test_merge_takes_only_parts_of_its_setting(teacher_run, capsys):
    assert teacher_flows_cli.main(["-c", teacher_run, "--shard", "1/2"]) == 0
    assert teacher_flows_cli.main(["-c", teacher_run, "--shard", "2/2",
                                   "--refine", "2"]) == 0
    capsys.readouterr()
    # The refined part has its own name: the raw merge is missing its part 2/2.
    assert teacher_flows_cli.main(["-c", teacher_run, "--merge"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "error:" in error[0], error
    assert not os.path.exists(flow_store.flows_path(teacher_run))
    for part in os.listdir(teacher_run):
        if part.startswith("teacher_flows"):
            os.remove(os.path.join(teacher_run, part))


# ----------------------------------------------------------------------------- evaluate
def test_evaluate_refine_scores_the_refined_flow(student_run_32, demo_dataset_32,
                                                 tmp_path, capsys):
    _, model = runs.load_model(student_run_32)
    dataset = load_dataset_config(demo_dataset_32)
    pairs = list_pairs(dataset, "demo-test")
    records, _ = evaluation.evaluate_pairs(model, dataset, pairs, batch=2,
                                           label_values=dataset.label_values,
                                           progress=False, refine=4)
    for record, (fixed_id, moving_id) in zip(records, pairs):
        pair = load_pair(dataset, fixed_id, moving_id)
        inputs = {"fixed": pair["fixed"][None], "moving": pair["moving"][None]}
        flow, _ = refine_flow(inputs["fixed"], inputs["moving"], model(inputs)["flow"], 4)
        expected = metrics.pair_metrics(pair["fixed_seg"][None], pair["moving_seg"][None],
                                        flow.numpy(), dataset.label_values)
        assert record["dice"] == pytest.approx(float(expected["dice"][0]), abs=2e-3)
        assert record["seconds"] > 0

    out = tmp_path / "evaluate"
    code = load_cli("evaluate").main(["-c", student_run_32, "-v", "demo-test", "--batch",
                                      "2", "--refine", "4", "--out", str(out),
                                      "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["student32-refine4-demo-test.csv",
                                                     "student32-refine4-demo-test.json",
                                                     "student32-refine4-demo-test.txt"]
    document = json.loads((out / "student32-refine4-demo-test.json").read_text())
    assert document["refine_steps"] == 4
    reported = reports.read_rcn_summary(out / "student32-refine4-demo-test.txt")
    assert reported["Dice score"][0] == pytest.approx(
        np.mean([r["dice"] for r in records]), abs=2e-3)
    assert load_cli("evaluate").main(["-c", student_run_32, "--refine", "-2",
                                      "--out", str(out)]) == 2
    assert "--refine: expected an integer >= 0" in capsys.readouterr().err


# ----------------------------------------------------------------------------- register
def test_register_refine_writes_the_refined_flow(savedmodel, nifti_pair,  # noqa: F811
                                                 tmp_path, capsys):
    from aldk_tf.cli import register as register_cli
    out_dir = tmp_path / "out"
    code = register_cli.main(["--model", savedmodel, "--fixed", nifti_pair["fixed"],
                              "--moving", nifti_pair["moving"], "--out", str(out_dir),
                              "--crop", "none", "--refine", "3"])
    assert code == 0, capsys.readouterr().err
    assert "refined by 3 steps on a 32x32x32 grid in" in capsys.readouterr().out

    fixed, moving = nib.load(nifti_pair["fixed"]), nib.load(nifti_pair["moving"])
    inputs = [preprocess_scan(image, size=fixed.shape, crop="none", intensity="max").volume
              .astype(np.float32)[None, ..., None] / 255.0 for image in (fixed, moving)]
    loaded = tf.saved_model.load(savedmodel)
    model_flow = loaded.signatures["serving_default"](fixed=tf.constant(inputs[0]),
                                                      moving=tf.constant(inputs[1]))["flow"]
    refined, _ = refine_flow(inputs[0], inputs[1], model_flow, 3)
    assert np.abs(refined - model_flow).max() > 0.1
    spacing = np.diag(fixed.affine)[:3]
    shift = moving.affine[:3, 3] - fixed.affine[:3, 3]
    written = nib.load(out_dir / "flow.nii.gz").get_fdata()[:, :, :, 0, :]
    written = written * [-1.0, -1.0, 1.0]                      # LPS (default) to RAS
    np.testing.assert_allclose(written, refined.numpy()[0] * spacing + shift, atol=1e-3)


def test_register_refines_on_a_finer_grid_warm_started_from_the_network(
        savedmodel, nifti_pair, tmp_path, capsys):  # noqa: F811
    """Scans twice as fine as the model's grid: --refine-grid 2 prepares both at 64^3
    (here their own grids), upsamples the network's 32^3 flow and refines there; the
    written flow is that refined flow. --refine-grid 4 is lowered to 2 (no finer than the
    scan)."""
    from scipy import ndimage

    from aldk_tf import spatial
    from aldk_tf.cli import register as register_cli
    from aldk_tf.deploy.register import refinement_factor
    fine = {}
    for role in ("fixed", "moving"):
        image = nib.load(nifti_pair[role])
        data = ndimage.zoom(np.asarray(image.dataobj, np.float32), 2, order=1,
                            grid_mode=True, mode="nearest")
        affine = image.affine.copy()
        affine[:3, :3] /= 2.0
        affine[:3, 3] -= 0.25 * np.diag(image.affine)[:3]          # same box edges
        fine[role] = str(tmp_path / f"{role}.nii.gz")
        nib.save(nib.Nifti1Image(np.clip(data, 0, None).astype(np.float32), affine),
                 fine[role])
    out_dir = tmp_path / "out"
    assert register_cli.main(["--model", savedmodel, "--fixed", fine["fixed"], "--moving",
                              fine["moving"], "--out", str(out_dir), "--crop", "none",
                              "--refine", "3", "--refine-grid", "4"]) == 0
    assert "refined by 3 steps on a 64x64x64 grid" in capsys.readouterr().out
    fixed, moving = nib.load(fine["fixed"]), nib.load(fine["moving"])
    prepared = {size: [preprocess_scan(image, size=(size,) * 3, crop="none",
                                       intensity="max").volume.astype(np.float32)
                       [None, ..., None] / 255.0 for image in (fixed, moving)]
                for size in (32, 64)}
    loaded = tf.saved_model.load(savedmodel)
    model_flow = loaded.signatures["serving_default"](
        fixed=tf.constant(prepared[32][0]), moving=tf.constant(prepared[32][1]))["flow"]
    refined, _ = refine_flow(*prepared[64], spatial.upsample_flow(model_flow, 2), 3,
                             learning_rate=0.5)
    spacing = np.diag(fixed.affine)[:3]
    shift = moving.affine[:3, 3] - fixed.affine[:3, 3]
    written = nib.load(out_dir / "flow.nii.gz").get_fdata()[:, :, :, 0, :]
    written = written * [-1.0, -1.0, 1.0]                      # LPS (default) to RAS
    np.testing.assert_allclose(written, refined.numpy()[0] * spacing + shift, atol=1e-3)
    # the factor: as asked, lowered to the scan's resolution, at least 1
    model, scan = np.diag([2.0, 2.0, 2.0, 1.0]), np.diag([1.0, 1.0, 1.0, 1.0])
    assert refinement_factor(4, model, scan) == 2
    assert refinement_factor(2, np.diag([2.1, 2.1, 2.1, 1]), np.diag([1.0, 1, 1, 1])) == 2
    assert refinement_factor(3, model, np.diag([2.0, 2.0, 2.0, 1.0])) == 1
