"""tf.data pair pipeline: pairing rules, values, shuffling, subset mixing, augmentation."""

import itertools

import h5py
import numpy as np
import pytest

from aldk_tf.data import (DataError, list_pairs, load_dataset_config, load_pair,
                          pair_dataset, write_dataset, write_dataset_config)

SIZE = (16, 16, 16)


@pytest.fixture
def config(tmp_path, rng):
    """Subset A: 4 scans with labels and landmarks; subset B: 3 bare scans."""
    scans = {}
    for index in range(4):
        point = np.full((6, 3), -1.0, np.float32)
        point[:3] = rng.uniform(0, 15, (3, 3))
        scans[f"a{index}"] = {"volume": rng.integers(0, 256, SIZE, dtype=np.uint8),
                              "segmentation": rng.choice([0, 1, 2], SIZE).astype(np.uint8),
                              "point": point}
    for index in range(3):
        scans[f"b{index}"] = {"volume": rng.integers(0, 256, SIZE, dtype=np.uint8)}
    write_dataset(tmp_path / "set.h5", scans)
    write_dataset_config(
        tmp_path / "set.json", files={"p": {"type": "HDF5", "path": "set.h5"}},
        subsets={"A": [f"p/a{i}" for i in range(4)], "B": [f"p/b{i}" for i in range(3)]},
        schemes={"1": {"A": 0.75, "B": 0.25}, "2": {"B": 1.0},
                 "test": {"A": 1.0, "B": 1.0}},
        image_size=SIZE, image_type="brain", segmentation_class_value={"x": 1, "y": 2})
    return load_dataset_config(tmp_path / "set.json")


def _raw(config, entry):
    """Independent reader: plain h5py."""
    with h5py.File(config.resolve_file("p"), "r") as file:
        return {name: file[entry.split("/")[1]][name][()]
                for name in file[entry.split("/")[1]]}


def _ids(dataset):
    return [(f.decode(), m.decode()) for batch in dataset
            for f, m in zip(batch["fixed_id"].numpy(), batch["moving_id"].numpy())]


def test_pairing_rules(config):
    a = config.subsets["A"]
    b = config.subsets["B"]
    assert list_pairs(config, "A") == list(itertools.permutations(a, 2))
    assert list_pairs(config, "test") == (list(itertools.permutations(a, 2)) +
                                          list(itertools.permutations(b, 2)))
    assert list_pairs(config, "A", paired=True) == [(a[0], a[1]), (a[1], a[0]),
                                                    (a[2], a[3]), (a[3], a[2])]
    assert list_pairs(config, "B", paired=True) == [(b[0], b[1]), (b[1], b[0])]
    config.atlas = "p/a0"
    assert list_pairs(config, "A") == [("p/a0", e) for e in a[1:]]
    assert list_pairs(config, "A", use_atlas=False) == list(itertools.permutations(a, 2))
    with pytest.raises(DataError, match="gives no pairs"):
        config.subsets["single"] = ["p/a0"]
        list_pairs(config, "single", use_atlas=False)


def test_evaluation_pairs_values_and_order(config):
    dataset = pair_dataset(config, "test", batch_size=5, shuffle=False)
    expected_pairs = list_pairs(config, "test")
    batches = list(dataset)
    assert [b["fixed"].shape[0] for b in batches] == [5, 5, 5, 3]
    assert _ids(batches) == expected_pairs
    first = batches[0]
    assert set(first) == {"fixed", "moving", "fixed_seg", "moving_seg", "fixed_point",
                          "moving_point", "fixed_id", "moving_id"}
    index = 0
    for batch in batches:
        for row in range(batch["fixed"].shape[0]):
            for side, entry in zip(("fixed", "moving"), expected_pairs[index]):
                raw = _raw(config, entry)
                np.testing.assert_array_equal(batch[side][row, ..., 0].numpy(),
                                              raw["volume"].astype(np.float32) / 255)
                seg = raw.get("segmentation", np.zeros(SIZE)).astype(np.float32)
                np.testing.assert_array_equal(batch[f"{side}_seg"][row, ..., 0], seg)
                point = raw.get("point", -np.ones((6, 3)))
                np.testing.assert_array_equal(batch[f"{side}_point"][row], point)
            index += 1
    assert first["fixed"].dtype.name == "float32" and first["fixed"].shape[1:] == (*SIZE, 1)
    numpy_pair = load_pair(config, *expected_pairs[1])
    for key, value in numpy_pair.items():
        if key.endswith("_id"):
            assert value == first[key][1].numpy().decode()
        else:
            np.testing.assert_array_equal(value, first[key][1].numpy())


def test_shuffling_is_seeded_and_changes_each_pass(config):
    everything = sorted(list_pairs(config, "A"))
    first = pair_dataset(config, "A", batch_size=4, shuffle=True, seed=3)
    order_1, order_2 = _ids(first), _ids(first)
    again = _ids(pair_dataset(config, "A", batch_size=4, shuffle=True, seed=3))
    other = _ids(pair_dataset(config, "A", batch_size=4, shuffle=True, seed=4))
    assert sorted(order_1) == sorted(order_2) == sorted(other) == everything
    assert order_1 == again
    assert order_1 != order_2 and order_1 != other
    assert order_1 != list_pairs(config, "A")


def test_training_scheme_mixes_subsets_by_fraction(config):
    dataset = pair_dataset(config, "1", batch_size=8, seed=1, repeat=True,
                           with_ids=True)
    ids = _ids(dataset.take(60))                          # 480 pairs
    from_a = np.mean([fixed.startswith("p/a") for fixed, _ in ids])
    assert abs(from_a - 0.75) < 4 * np.sqrt(0.75 * 0.25 / len(ids))
    assert all(f[:3] == m[:3] for f, m in ids)            # pairs never cross subsets
    without_ids = next(iter(pair_dataset(config, "1", batch_size=2, with_ids=False)))
    assert "fixed_id" not in without_ids and "moving" in without_ids


def test_augmentation_changes_only_the_moving_side(config):
    plain = next(iter(pair_dataset(config, "A", batch_size=3, shuffle=False)))
    augmented = next(iter(pair_dataset(config, "A", batch_size=3, shuffle=False,
                                       augment=True, seed=5)))
    for key in ("fixed", "fixed_seg", "fixed_point", "fixed_id", "moving_id"):
        np.testing.assert_array_equal(plain[key].numpy(), augmented[key].numpy())
    assert not np.allclose(plain["moving"], augmented["moving"])
    moving = augmented["moving"].numpy()
    assert moving.min() >= 0.0 and moving.max() <= 1.0
    assert set(np.unique(augmented["moving_seg"])) <= {0.0, 1.0, 2.0}
    absent = plain["moving_point"].numpy() < 0
    np.testing.assert_array_equal(augmented["moving_point"].numpy()[absent], -1.0)
    assert not np.allclose(plain["moving_point"].numpy()[~absent],
                           augmented["moving_point"].numpy()[~absent])


def test_pipeline_errors_are_data_errors(config, tmp_path):
    with pytest.raises(DataError, match="unknown scheme or subset 'nope'"):
        pair_dataset(config, "nope", batch_size=1)
    (tmp_path / "set.h5").unlink()
    with pytest.raises(DataError, match="files\\['p'\\]"):
        pair_dataset(config, "2", batch_size=1)
