"""aldk_tf/evaluation.py and the evaluate.py front end, on the 32^3 demo set."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from aldk_tf import evaluation, metrics, reports

from aldk_tf.training import runs
from aldk_tf.data import list_pairs, load_dataset_config, load_pair
from scripts import load_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_and_data(student_run_32, demo_dataset_32):
    _, model = runs.load_model(student_run_32)
    return model, load_dataset_config(demo_dataset_32)


def test_evaluate_pairs_equals_the_library_metrics_pair_by_pair(run_and_data):
    model, dataset = run_and_data
    pairs = list_pairs(dataset, "test")
    records, summary = evaluation.evaluate_pairs(model, dataset, pairs, batch=2,
                                                 label_values=dataset.label_values,
                                                 progress=False)
    assert [(r["fixed_id"], r["moving_id"]) for r in records] == pairs
    for record, (fixed_id, moving_id) in zip(records, pairs):
        pair = load_pair(dataset, fixed_id, moving_id)
        flow = model({"fixed": pair["fixed"][None], "moving": pair["moving"][None]})["flow"]
        expected = metrics.pair_metrics(pair["fixed_seg"][None], pair["moving_seg"][None],
                                        flow, dataset.label_values,
                                        pair["fixed_point"][None], pair["moving_point"][None])
        for key in ("dice", "jacc", "landmark_distance", "jacobian_det_std",
                    "folding_percent"):
            assert record[key] == pytest.approx(float(expected[key][0]), abs=1e-5), key
        assert list(record["dice_labels"]) == ["CSF", "GM", "WM"]
        np.testing.assert_allclose(list(record["dice_labels"].values()),
                                   expected["dice_labels"][0], atol=1e-5)
        assert record["seconds"] > 0
    # The perturbed model moves voxels, so Dice is neither perfect nor trivial.
    assert 0.05 < summary["dice"]["mean"] < 0.99
    assert summary["dice"]["mean"] == pytest.approx(np.mean([r["dice"] for r in records]))


def test_batch_size_does_not_change_the_metrics(run_and_data):
    model, dataset = run_and_data
    pairs = list_pairs(dataset, "test")
    one, _ = evaluation.evaluate_pairs(model, dataset, pairs, 1, dataset.label_values,
                                       progress=False)
    two, _ = evaluation.evaluate_pairs(model, dataset, pairs, 2, dataset.label_values,
                                       progress=False)
    for a, b in zip(one, two):
        assert a["dice"] == pytest.approx(b["dice"], abs=1e-6)
        assert a["jacobian_det_std"] == pytest.approx(b["jacobian_det_std"], abs=1e-5)


def record(fixed, moving, dice, jacc, landmark, jacobian):
    return {"fixed_id": fixed, "moving_id": moving, "dice": dice, "jacc": jacc,
            "landmark_distance": landmark, "jacobian_det_std": jacobian,
            "folding_percent": 0.0, "seconds": 0.5, "dice_labels": {"mask": dice},
            "jacc_labels": {"mask": jacc}}


def test_rcn_report_format(tmp_path):
    records = [record("a/1", "a/2", 0.5, 0.25, 2.0, 0.1),
               record("a/2", "a/1", 0.75, 0.5, float("nan"), 0.3)]
    path = tmp_path / "run.txt"
    reports.write_rcn_report(path, records)
    lines = path.read_text().splitlines()
    assert lines[:3] == ["a/1 a/2 0.5 0.25 2.0 0.1", "a/2 a/1 0.75 0.5 nan 0.3", "Summary"]
    assert lines[3] == f"Dice score: {np.mean([0.5, 0.75])} ({np.std([0.5, 0.75])})"
    assert lines[4] == f"Jacc score: {np.mean([0.25, 0.5])} ({np.std([0.25, 0.5])})"
    assert lines[5] == "Landmark distance: 2.0 (0.0)"           # NaN left out
    assert lines[6] == f"Jacobian determinant: {np.mean([0.1, 0.3])} ({np.std([0.1, 0.3])})"
    assert len(lines) == 7
    summary = reports.read_rcn_summary(path)
    assert summary["Dice score"] == pytest.approx((0.625, 0.125))
    assert list(tmp_path.iterdir()) == [path]                   # no temporary left over


def test_cli_writes_reports_that_match_the_library(run_and_data, student_run_32,
                                                   demo_dataset_32, tmp_path, capsys):
    model, dataset = run_and_data
    cli = load_cli("evaluate")
    out = tmp_path / "evaluate"
    code = cli.main(["-c", student_run_32, "-v", "demo-test", "--batch", "2",
                     "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    _, summary = evaluation.evaluate_pairs(model, dataset, list_pairs(dataset, "demo-test"),
                                           1, dataset.label_values, progress=False)
    text = out / "student32-demo-test.txt"
    reported = reports.read_rcn_summary(text)
    assert reported["Dice score"][0] == pytest.approx(summary["dice"]["mean"], abs=1e-6)
    assert reported["Jacobian determinant"][0] == pytest.approx(
        summary["jacobian_det_std"]["mean"], abs=1e-5)
    assert len(text.read_text().splitlines()) == 2 + 1 + 4
    document = json.loads((out / "student32-demo-test.json").read_text())
    assert document["scheme"] == "demo-test" and len(document["pairs"]) == 2
    assert set(document["summary"]["dice_labels"]) == {"CSF", "GM", "WM"}
    assert document["pairs"][0]["folding_percent"] >= 0
    assert document["pairs"][0]["seconds"] > 0
    assert document["parameters"] == model.count_params()


def test_cli_default_scheme_and_rep_name(student_run_32, tmp_path, capsys):
    cli = load_cli("evaluate")
    code = cli.main(["-c", student_run_32, "-r", "2", "--out", str(tmp_path),
                     "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student32-rep2.csv",
                                                          "student32-rep2.json",
                                                          "student32-rep2.txt"]
    document = json.loads((tmp_path / "student32-rep2.json").read_text())
    assert document["scheme"] == "2" and document["rep"] == 2


def write_resized_config(demo_dataset_32, tmp_path):
    data = json.loads(Path(demo_dataset_32).read_text())
    data["image_size"] = [64, 64, 64]
    data["files"]["demo"]["path"] = str(Path(demo_dataset_32).parent / "demo.h5")
    path = tmp_path / "demo64.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("case, expected", [
    ("no_config", "no config.json"),
    ("unknown_subset", "unknown scheme or subset 'nope'"),
    ("size_mismatch", "size mismatch"),
    ("not_writable", "not writable"),
])
def test_cli_errors_are_one_line_and_leave_nothing(case, expected, student_run_32,
                                                   demo_dataset_32, tmp_path, capsys):
    cli = load_cli("evaluate")
    out = tmp_path / "evaluate"
    args = ["-c", student_run_32, "-v", "demo-test", "--out", str(out),
            "--no-progress"]
    if case == "no_config":
        empty = tmp_path / "weights" / "empty"
        empty.mkdir(parents=True)
        args[1] = str(empty)
    elif case == "unknown_subset":
        args[3] = "demo-test,nope"
    elif case == "size_mismatch":
        args += ["-d", write_resized_config(demo_dataset_32, tmp_path)]
    elif case == "not_writable":
        blocker = tmp_path / "file"
        blocker.write_text("")
        out = blocker / "evaluate"
        args[5] = str(out)
    code = cli.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    if case == "unknown_subset":
        assert "demo-test" in err[0] and "demo-val" in err[0]      # lists the known ones
    assert not out.exists() or not any(out.iterdir())


def test_summary_ignores_missing_landmarks():
    records = [record("a", "b", 0.5, 0.3, float("nan"), 0.1)]
    summary = reports.summarise(records)
    assert math.isnan(summary["landmark_distance"]["mean"])
    assert summary["dice"] == {"mean": 0.5, "std": 0.0}
    assert os.path.basename(load_cli("evaluate").report_stem("weights/run/", None, None)) \
        == "run"


@pytest.fixture(scope="module")
def exported_alone(savedmodel_32, demo_dataset_32, tmp_path_factory):
    """A SavedModel away from any run directory, with the export_info.json fields that
    export.py writes and evaluation reads (the dataset, rep, parameters)."""
    import shutil
    model = tmp_path_factory.mktemp("exported") / "student" / "1"
    shutil.copytree(savedmodel_32, model)
    (model / "export_info.json").write_text(json.dumps(
        {"dataset": demo_dataset_32, "rep": 1, "parameters": 123, "model": {}}))
    return model


def test_cli_exported_model_alone_writes_rcn_report_and_label_csv(
        exported_alone, demo_dataset_32, tmp_path, capsys):
    import csv
    code = load_cli("evaluate").main(["--exported", str(exported_alone), "-v", "test",
                                      "--out", str(tmp_path), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    stem = tmp_path / "student-v1-savedmodel-test"
    text = Path(f"{stem}.txt").read_text().splitlines()
    dataset = load_dataset_config(demo_dataset_32)
    pairs = list_pairs(dataset, "test")
    assert len(text) == len(pairs) + 5 and text[len(pairs)] == "Summary"
    summary = reports.read_rcn_summary(f"{stem}.txt")
    with open(f"{stem}.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == reports.CSV_COLUMNS
    labels = ["CSF", "GM", "WM"]
    assert len(rows) == 2 * len(pairs) * len(labels)
    assert [row["stage"] for row in rows[:6]] == ["before"] * 3 + ["after"] * 3
    assert {row["distance_unit"] for row in rows} == {"mm"}
    # Independent reference for the first pair: unwarped (before) and warped (after)
    # masks scored with numpy Dice and the surface distances on the fixed scan's spacing.
    fixed_id, moving_id = pairs[0]
    pair = load_pair(dataset, fixed_id, moving_id)
    loaded = __import__("tensorflow").saved_model.load(str(exported_alone))
    flow = loaded.signatures["serving_default"](fixed=pair["fixed"][None],
                                                moving=pair["moving"][None])["flow"]
    fixed_masks = metrics.segmentation_masks(pair["fixed_seg"][None], [1, 2, 3])[0]
    stages = {"before": metrics.segmentation_masks(pair["moving_seg"][None], [1, 2, 3])[0],
              "after": metrics.warp_segmentation(pair["moving_seg"][None], flow.numpy(),
                                                 [1, 2, 3])[0]}
    from aldk_tf.data import ScanStore
    with ScanStore(dataset) as store:
        affine = store.read(fixed_id)["attrs"]["affine"]
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    assert not np.allclose(spacing, 1.0)
    for row in rows[:6]:
        assert (row["fixed_id"], row["moving_id"]) == (fixed_id, moving_id)
        index = labels.index(row["label"])
        a, b = fixed_masks[..., index], stages[row["stage"]][..., index]
        assert float(row["dice"]) == pytest.approx(
            2 * np.sum(a & b) / (a.sum() + b.sum()), abs=1e-5)
        hd95, mean = metrics.surface_distances(a, b, spacing)
        assert float(row["hd95"]) == pytest.approx(hd95, rel=1e-5)
        assert float(row["mean_surface_distance"]) == pytest.approx(mean, rel=1e-5)
        if row["stage"] == "before":
            assert float(row["folding_percent"]) == 0.0
    # The text report is the RCN format over the "after" scores.
    after_dice = [np.nanmean([float(r["dice"]) for r in rows
                              if r["stage"] == "after" and r["fixed_id"] == f
                              and r["moving_id"] == m]) for f, m in pairs]
    assert summary["Dice score"][0] == pytest.approx(np.mean(after_dice), abs=1e-5)
    document = json.loads(Path(f"{stem}.json").read_text())
    assert document["run"] is None and "before" in document["summary"]
    # TRE in mm: landmarks mapped through the flow (scipy trilinear), the difference to
    # the moving landmarks through the moving scan's affine.
    from scipy import ndimage
    with ScanStore(dataset) as store:
        moving_affine = store.read(moving_id)["attrs"]["affine"]
    points, targets = pair["fixed_point"], pair["moving_point"]
    valid = (points >= 0).all(1) & (targets >= 0).all(1)
    assert valid.sum() >= 3
    displacement = np.stack([ndimage.map_coordinates(flow.numpy()[0, ..., axis],
                                                     points[valid].T, order=1)
                             for axis in range(3)], axis=-1)
    difference = (points[valid] + displacement - targets[valid]) @ moving_affine[:3, :3].T
    tre = np.linalg.norm(difference, axis=1).mean()
    assert document["pairs"][0]["landmark_distance_mm"] == pytest.approx(tre, abs=1e-3)
    assert document["summary"]["hd95"]["mean"] > 0
    # The TRE in mm also in the CSV (every row of the pair) and the printed summary.
    first = [row for row in rows if (row["fixed_id"], row["moving_id"]) == pairs[0]
             and row["stage"] == "after"]
    assert first and all(float(row["tre_mm"]) == pytest.approx(tre, abs=1e-3)
                         for row in first)
    mean_tre = document["summary"]["landmark_distance_mm"]["mean"]
    assert f"TRE {mean_tre:.2f} mm" in capsys.readouterr().out


def test_cli_exported_alone_without_a_dataset_fails_with_one_line(exported_alone,
                                                                  tmp_path, capsys):
    import shutil
    model = tmp_path / "m" / "1"
    shutil.copytree(exported_alone, model)
    info = json.loads((model / "export_info.json").read_text())
    del info["dataset"]
    (model / "export_info.json").write_text(json.dumps(info))
    code = load_cli("evaluate").main(["--exported", str(model), "--out",
                                      str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pass -d" in err[0], err
    assert not (tmp_path / "out").exists()


def test_flags_are_hyphenated_with_the_old_spellings_as_aliases():
    from aldk_tf.cli import evaluate, train

    new = train.make_parser().parse_args(
        ["-b", "LDR", "-n", "2", "--no-augment", "--max-steps", "3", "--teacher-online",
         "--weights-dir", "w", "--verbose", "0"])
    old = train.make_parser().parse_args(
        ["--base_network", "LDR", "--n_cascades", "2", "--no_augment", "--max_steps", "3",
         "--teacher_online", "--weights_dir", "w", "--verbose", "0"])
    assert vars(new) == vars(old)
    assert (new.base_network, new.n_cascades, new.no_augment, new.max_steps) == \
        ("LDR", 2, True, 3)
    new = evaluate.parse_args(["-c", "run", "-v", "test", "--out", "reports"])
    old = evaluate.parse_args(["-c", "run", "--val_subset", "test", "--out-dir", "reports"])
    assert vars(new) == vars(old) and new.out == "reports" and new.val_subset == "test"


def test_refine_grid_scores_a_model_on_a_dataset_twice_as_fine(demo_dataset_32, tmp_path,
                                                               capsys):
    """A 16^3 student on the 32^3 demo pairs: reports named -grid2, refinement on the
    fine grid helps, and a grid that does not fit is one line naming both sizes."""
    from synthetic import perturbed_student_run
    run_dir = perturbed_student_run(tmp_path / "student16", demo_dataset_32, 16, std=0.02,
                                    seed=1)
    evaluate = load_cli("evaluate")
    out = tmp_path / "out"
    dice = {}
    for steps in (0, 20):
        flags = ["-c", run_dir, "-v", "test", "--out", str(out), "--no-progress",
                 "--no-surface", "--refine-grid", "2", "--refine", str(steps)]
        assert evaluate.main(flags) == 0
        stem = f"student16{f'-refine{steps}' if steps else ''}-grid2-test"
        report = json.loads((out / f"{stem}.json").read_text())
        assert report["refine_grid"] == 2
        dice[steps] = report["summary"]["dice"]["mean"]
    assert dice[20] > dice[0] + 0.01, dice
    capsys.readouterr()
    code = evaluate.main(["-c", run_dir, "-v", "test", "--out", str(tmp_path / "o3"),
                          "--refine-grid", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "3x finer grid takes (48, 48, 48)" in err[0], err
    assert not (tmp_path / "o3").exists()
