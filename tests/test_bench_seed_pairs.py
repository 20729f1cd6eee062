"""bench/seed_pairs.py: rows paired by seed, their differences and the summary, against
numpy; bad input is one line and exit status 2."""

import json

import numpy as np
import pytest

from scripts import load_script

seed_pairs = load_script("bench/seed_pairs.py")


def write_inputs(tmp_path, test_dice: dict, histories: dict):
    test = tmp_path / "heldout.json"
    test.write_text(json.dumps({"command": "x", "rows": {
        name: {"dice": value, "pairs": 30} for name, value in test_dice.items()}}))
    records = tmp_path / "records"
    records.mkdir()
    for name, history in histories.items():
        (records / f"long-{name}.json").write_text(json.dumps({"history": history}))
    return str(test), str(records)


def test_differences_and_summary_match_numpy(tmp_path):
    rng = np.random.default_rng(3)
    baseline = rng.uniform(0.5, 0.6, 3)
    row = baseline + np.array([0.012, -0.004, 0.020])
    test_dice = {**{f"dist_s{k}": float(row[k]) for k in range(3)},
                 **{f"student_s{k}": float(baseline[k]) for k in range(3)}}
    histories = {f"dist_s{k}": [[400, 0.1], [1200, 0.4 + k / 100]] for k in range(3)}
    test, records = write_inputs(tmp_path, test_dice, histories)
    out = tmp_path / "pairs.json"
    assert seed_pairs.main(["--test", test, "--records", records, "--compare",
                            "dist:student", "--seeds", "0", "1", "2",
                            "--json", str(out), "--markdown", str(tmp_path / "t.md")]) == 0
    comparison = json.loads(out.read_text())["comparisons"][0]
    differences = row - baseline
    assert [e["difference"] for e in comparison["seeds"]] == pytest.approx(differences)
    assert comparison["mean"] == pytest.approx(differences.mean())
    assert comparison["sd"] == pytest.approx(differences.std(ddof=1))
    assert comparison["se"] == pytest.approx(differences.std(ddof=1) / np.sqrt(3))
    assert comparison["ahead"] == bool(differences.mean()
                                       - 2 * differences.std(ddof=1) / np.sqrt(3) > 0)
    # the validation Dice is the last validated step's, not the best; no record: None
    assert [e["validation"][0] for e in comparison["seeds"]] == pytest.approx(
        [0.40, 0.41, 0.42])
    assert [e["validation"][1] for e in comparison["seeds"]] == [None, None, None]
    assert "**+0.9**" in (tmp_path / "t.md").read_text()


def test_summary_of_one_seed_has_no_spread():
    assert seed_pairs.summary([0.01]) == {"mean": 0.01, "sd": None, "se": None,
                                          "ahead": None}
    assert seed_pairs.summary([0.02, 0.021, 0.019])["ahead"] is True
    assert seed_pairs.summary([0.02, -0.01, 0.0])["ahead"] is False


@pytest.mark.parametrize("compare, expected", [
    ("dist:student", "no test row 'student_s1'"),
    ("dist", "expected ROW:BASELINE"),
])
def test_bad_input_is_one_line(tmp_path, capsys, compare, expected):
    test, records = write_inputs(tmp_path, {"dist_s0": 0.5, "dist_s1": 0.5,
                                            "student_s0": 0.5}, {})
    assert seed_pairs.main(["--test", test, "--records", records, "--compare", compare,
                            "--seeds", "0", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0]


def test_a_file_that_is_not_heldout_json_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert seed_pairs.main(["--test", str(bad), "--records", str(tmp_path), "--compare",
                            "a:b", "--seeds", "0"]) == 2
    assert "--test" in capsys.readouterr().err
