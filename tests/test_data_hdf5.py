"""RCN-layout HDF5 + JSON: hand-written files load, round trips are exact, errors are clear."""

import json

import h5py
import numpy as np
import pytest

from aldk_tf.data import (DataError, DatasetConfig, ScanStore, list_scans,
                          load_dataset_config, read_dataset, write_dataset,
                          write_dataset_config)

SIZE = (16, 16, 16)


def _volume(rng, shape=SIZE):
    return rng.integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture
def rcn_files(tmp_path, rng, monkeypatch):
    """Files written with raw h5py/JSON exactly as the RCN release lays them out.

    The JSON paths are relative to the working directory ("datasets/..."), as in the
    original brain.json/liver.json, and one file is registered under the "/" prefix.
    """
    monkeypatch.chdir(tmp_path)
    (tmp_path / "datasets").mkdir()
    arrays = {}
    with h5py.File(tmp_path / "datasets" / "lpba_val.h5", "w") as file:
        for key in ("S01", "S02", "S03"):
            group = file.create_group(key)
            arrays[f"lpba/{key}"] = {
                "volume": _volume(rng),
                "segmentation": rng.choice([0, 21, 22, 181], SIZE).astype(np.uint8),
                "point": np.concatenate([rng.uniform(0, 15, (4, 3)),
                                         -np.ones((2, 3))]).astype(np.float32)}
            for name, value in arrays[f"lpba/{key}"].items():
                group.create_dataset(name, data=value)
    with h5py.File(tmp_path / "datasets" / "adni.h5", "w") as file:
        for key in ("1", "2"):
            arrays[f"adni/{key}"] = {"volume": _volume(rng)}
            file.create_group(key).create_dataset("volume", data=arrays[f"adni/{key}"]
                                                  ["volume"])
    with h5py.File(tmp_path / "datasets" / "msd_dataset.h5", "w") as file:
        arrays["hepaticvessel/1"] = {"volume": _volume(rng)}
        file.create_group("hepaticvessel").create_group("1").create_dataset(
            "volume", data=arrays["hepaticvessel/1"]["volume"])
    text = """{
  "files": {
    "/": {"type": "HDF5", "path": "datasets/msd_dataset.h5"},
    "lpba": {"path": "datasets/lpba_val.h5", "type": "HDF5"},
    "adni": {"path": "datasets/adni.h5", "type": "HDF5"}
  },
  "image_size": [16, 16, 16],
  "image_type": "brain",
  "atlas": "lpba/S01",
  "segmentation_class_value": {"21": 21, "22": 22, "181": 181},
  "schemes": {"1": {"combine-train": 1.0}, "2": {"lpba-val": 1.0}},
  "subsets": {
    "combine-train": ["adni/1", "adni/2", "hepaticvessel/1"],
    "lpba-val": ["lpba/S01", "lpba/S02", "lpba/S03"]
  },
  "task": "registration"
}
"""
    json_path = tmp_path / "datasets" / "brain.json"
    json_path.write_text(text)
    return json_path, arrays


def test_hand_written_rcn_files_load(rcn_files):
    json_path, arrays = rcn_files
    config = load_dataset_config(json_path)
    assert config.image_size == SIZE and config.image_type == "brain"
    assert config.atlas == "lpba/S01" and config.paired is False
    assert config.label_values == [21, 22, 181]
    assert config.extra == {"task": "registration"}
    assert config.scheme_ids("1") == ["adni/1", "adni/2", "hepaticvessel/1"]
    assert config.scheme_ids(2) == ["lpba/S01", "lpba/S02", "lpba/S03"]
    assert config.scheme_ids("lpba-val") == config.scheme_ids("2")
    assert config.split_entry("hepaticvessel/1") == ("/", "hepaticvessel/1")
    assert config.validate(check_labels=True)
    with ScanStore(config) as store:
        for entry, expected in arrays.items():
            scan = store.read(entry)
            for name, value in expected.items():
                np.testing.assert_array_equal(scan[name], value)
                assert scan[name].dtype == value.dtype
            assert set(scan) - {"attrs"} == set(expected)


def test_paths_resolve_beside_the_json_first(tmp_path, rng, monkeypatch):
    write_dataset(tmp_path / "data" / "a.h5", {"x": {"volume": _volume(rng)},
                                               "y": {"volume": _volume(rng)}})
    write_dataset_config(tmp_path / "data" / "a.json", files={"a": {"path": "a.h5"}},
                         subsets={"s": ["a/x", "a/y"]}, schemes={"1": {"s": 1.0}},
                         image_size=SIZE)
    monkeypatch.chdir(tmp_path)                 # "a.h5" is not in the cwd
    config = load_dataset_config("data/a.json")
    assert config.resolve_file("a") == tmp_path / "data" / "a.h5"


def test_round_trip_is_exact(tmp_path, rng):
    scans = {
        "s1": {"volume": _volume(rng), "segmentation": rng.integers(0, 4, SIZE,
                                                                     dtype=np.uint8),
               "point": np.array([[1.5, 2.25, 3], [4, 5, 6], [-1, -1, -1], [7, 8, 9.75],
                                  [-1, -1, -1], [0, 0, 0]], np.float32),
               "attrs": {"affine": rng.normal(size=(4, 4)), "source": "s1.nii.gz",
                         "crop_start": np.array([1, 2, 3])}},
        "s2": {"volume": _volume(rng)},
        "group/nested": {"volume": _volume(rng), "point": -np.ones((6, 3), np.float64)},
    }
    h5_path = write_dataset(tmp_path / "set.h5", scans)
    loaded = read_dataset(h5_path)
    assert sorted(loaded) == sorted(scans) == list_scans(h5_path)
    for key, scan in scans.items():
        for name in ("volume", "segmentation", "point"):
            if name in scan:
                np.testing.assert_array_equal(loaded[key][name], scan[name])
                assert loaded[key][name].dtype == scan[name].dtype
            else:
                assert name not in loaded[key]
        for name, value in scan.get("attrs", {}).items():
            np.testing.assert_array_equal(loaded[key]["attrs"][name], value)

    fields = dict(files={"p": {"type": "HDF5", "path": "set.h5"}},
                  subsets={"train": ["p/s1", "p/s2"], "val": ["p/group/nested", "p/s1"]},
                  schemes={"1": {"train": 0.7, "val": 0.3}, "2": {"val": 1.0},
                           "test": {"val": 1.0}},
                  image_size=SIZE, image_type="brain",
                  segmentation_class_value={"a": 1, "b": 3}, atlas="p/s2", paired=True)
    written = write_dataset_config(tmp_path / "set.json", **fields, task="registration")
    loaded_config = load_dataset_config(tmp_path / "set.json")
    assert loaded_config == written
    for name, value in fields.items():
        expected = tuple(value) if name == "image_size" else value
        assert getattr(loaded_config, name) == expected
    assert loaded_config.extra == {"task": "registration"}
    assert json.loads((tmp_path / "set.json").read_text()) == loaded_config.to_json()
    loaded_config.validate(check_labels=True)


# ----------------------------------------------------------------------------- errors
def _dataset(tmp_path, rng, scans=None, **config_changes):
    """A small valid dataset; ``scans`` / ``config_changes`` break one thing."""
    scans = scans if scans is not None else {
        "a": {"volume": _volume(rng), "segmentation": np.ones(SIZE, np.uint8)},
        "b": {"volume": _volume(rng)}}
    with h5py.File(tmp_path / "d.h5", "w") as file:   # raw h5py: may be invalid on purpose
        for key, scan in scans.items():
            group = file.create_group(key)
            for name, value in scan.items():
                group.create_dataset(name, data=value)
    raw = {"files": {"d": {"type": "HDF5", "path": "d.h5"}},
           "subsets": {"s": ["d/a", "d/b"]}, "schemes": {"1": {"s": 1.0}},
           "image_size": list(SIZE), "image_type": "brain",
           "segmentation_class_value": {"one": 1}}
    raw.update(config_changes)
    (tmp_path / "d.json").write_text(json.dumps(raw))
    return tmp_path / "d.json"


def _expect(call, *fragments):
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert str(fragment) in message, message
    return message


def _load_and_validate(path, check_labels=False):
    return lambda: load_dataset_config(path).validate(check_labels=check_labels)


def test_error_missing_json(tmp_path):
    _expect(lambda: load_dataset_config(tmp_path / "nope.json"), "nope.json", "not found")


def test_error_invalid_json(tmp_path):
    (tmp_path / "bad.json").write_text("{\"files\": ")
    _expect(lambda: load_dataset_config(tmp_path / "bad.json"), "bad.json", "invalid JSON")


def test_error_missing_key(tmp_path, rng):
    path = _dataset(tmp_path, rng)
    raw = json.loads(path.read_text())
    del raw["subsets"]
    path.write_text(json.dumps(raw))
    _expect(lambda: load_dataset_config(path), "d.json", "'subsets'")


def test_error_missing_hdf5(tmp_path, rng):
    path = _dataset(tmp_path, rng, files={"d": {"type": "HDF5", "path": "gone.h5"}})
    _expect(_load_and_validate(path), "d.json", "files['d']", "gone.h5", "not found")


def test_error_corrupt_hdf5(tmp_path, rng):
    path = _dataset(tmp_path, rng)
    (tmp_path / "d.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 4)
    _expect(_load_and_validate(path), "d.h5", "not a readable HDF5 file")


def test_error_missing_group(tmp_path, rng):
    path = _dataset(tmp_path, rng, subsets={"s": ["d/a", "d/zz"]})
    _expect(_load_and_validate(path), "d.h5", "no group 'zz'", "d/zz")


def test_error_missing_volume(tmp_path, rng):
    path = _dataset(tmp_path, rng, scans={"a": {"volume": _volume(rng)},
                                          "b": {"segmentation": np.ones(SIZE, np.uint8)}})
    _expect(_load_and_validate(path), "d.h5", "group 'b'", "'volume'")


@pytest.mark.parametrize("name, value, fragment", [
    ("volume", np.zeros(SIZE, np.float32), "'b/volume' has dtype float32"),
    ("volume", np.zeros((16, 16), np.uint8), "'b/volume' has shape (16, 16)"),
    ("segmentation", np.zeros(SIZE, np.float32), "'b/segmentation' has dtype float32"),
    ("segmentation", np.zeros((8, 8, 8), np.uint8), "'b/segmentation' has shape"),
    ("point", np.zeros((5, 3), np.float32), "'b/point' has shape (5, 3)"),
])
def test_error_wrong_dtype_or_shape(tmp_path, rng, name, value, fragment):
    scan_b = {"volume": _volume(rng), name: value}
    path = _dataset(tmp_path, rng, scans={"a": {"volume": _volume(rng)}, "b": scan_b})
    _expect(_load_and_validate(path), "d.h5", fragment)


def test_error_different_sizes(tmp_path, rng):
    path = _dataset(tmp_path, rng, scans={"a": {"volume": _volume(rng)},
                                          "b": {"volume": _volume(rng, (16, 16, 12))}})
    _expect(_load_and_validate(path), "d.h5", "'b/volume' has shape (16, 16, 12)",
            "image_size is (16, 16, 16)")
    with pytest.raises(DataError, match="same size"):
        write_dataset(tmp_path / "w.h5", {"a": {"volume": _volume(rng)},
                                          "b": {"volume": _volume(rng, (8, 8, 8))}})


def test_error_labels_absent_everywhere(tmp_path, rng):
    path = _dataset(tmp_path, rng, segmentation_class_value={"one": 1, "seven": 7})
    _load_and_validate(path)()                       # metadata checks pass
    _expect(_load_and_validate(path, check_labels=True), "d.json", "'seven': 7",
            "segmentation_class_value")


def test_error_empty_subset(tmp_path, rng):
    path = _dataset(tmp_path, rng, subsets={"s": ["d/a", "d/b"], "empty": []})
    _expect(lambda: load_dataset_config(path), "d.json", "subsets['empty']", "empty")


def test_error_unknown_names(tmp_path, rng):
    config = load_dataset_config(_dataset(tmp_path, rng))
    _expect(lambda: config.scheme_ids("test"), "d.json", "'test'", "schemes: ['1']",
            "subsets: ['s']")
    path = _dataset(tmp_path, rng, schemes={"1": {"nope": 1.0}})
    _expect(lambda: load_dataset_config(path), "schemes['1']", "unknown subset 'nope'")
    path = _dataset(tmp_path, rng, subsets={"s": ["d/a", "other/b"]})
    _expect(lambda: load_dataset_config(path), "d.json", "'other/b'", "no known file prefix")


# ----------------------------------------------------------------------------- atomicity
def test_failed_write_leaves_no_partial_files(tmp_path, rng):
    target = tmp_path / "set.h5"
    target.write_bytes(b"previous contents")

    def scans():
        yield "ok", {"volume": _volume(rng)}
        yield "bad", {"volume": _volume(rng).astype(np.int16)}

    _expect(lambda: write_dataset(target, scans()), "set.h5", "'bad'", "dtype int16")
    assert target.read_bytes() == b"previous contents"
    with pytest.raises(DataError):
        write_dataset(tmp_path / "new.h5", scans())
    with pytest.raises(DataError, match="unknown subset"):
        write_dataset_config(tmp_path / "new.json", files={"p": {"path": "new.h5"}},
                             subsets={"s": ["p/ok"]}, schemes={"1": {"x": 1.0}},
                             image_size=SIZE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set.h5"]


def test_config_defaults_match_the_original(tmp_path, rng):
    path = _dataset(tmp_path, rng)
    raw = json.loads(path.read_text())
    for key in ("image_size", "image_type", "segmentation_class_value"):
        del raw[key]
    path.write_text(json.dumps(raw))
    config = load_dataset_config(path)
    assert config.image_size == (128, 128, 128)
    assert config.segmentation_class_value is None and config.label_values is None
    assert isinstance(config, DatasetConfig) and config.atlas is None
