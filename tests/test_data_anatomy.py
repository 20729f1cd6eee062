"""Anatomy variation and templates from a T1: tissue mixture against known classes,
variation changes shapes a warp cannot, held-out templates in the demo builder."""

import nibabel as nib
import numpy as np
import pytest

from aldk_tf.data.anatomy import template_from_t1, tissue_mixture, vary_anatomy


def phantom(size=32):
    """A sphere brain: WM core, GM shell, CSF ventricle; intensities 0.3 / 0.6 / 0.9."""
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1) - size / 2
    radius = np.linalg.norm(grid, axis=-1)
    labels = np.zeros((size,) * 3, np.uint8)
    labels[radius < 13] = 2
    labels[radius < 9] = 3
    labels[np.linalg.norm(grid - [0, 3, 0], axis=-1) < 3] = 1
    means = np.array([0.0, 0.3, 0.6, 0.9])
    return labels, means[labels]


def test_tissue_mixture_recovers_known_classes():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(m, 0.04, n) for m, n in
                             ((0.3, 400), (0.6, 2000), (0.9, 1200))])
    means, stds, weights = tissue_mixture(rng.permutation(values))
    np.testing.assert_allclose(means, [0.3, 0.6, 0.9], atol=0.02)
    np.testing.assert_allclose(weights, np.array([400, 2000, 1200]) / 3600, atol=0.03)
    np.testing.assert_allclose(stds, 0.04, atol=0.01)


def test_template_from_t1_labels_a_phantom():
    labels, t1 = phantom()
    noisy = t1 * 300.0 + np.random.default_rng(1).normal(0, 6.0, t1.shape) * (labels > 0)
    template = template_from_t1(np.clip(noisy, 0, None))
    assert template["t1"].max() <= 1.0 and template["t1"].min() >= 0.0
    np.testing.assert_allclose(template["probabilities"].sum(-1), 1.0, atol=1e-5)
    assert np.mean(template["labels"] == labels) > 0.97


@pytest.mark.parametrize("bad", [np.zeros((8, 8)), np.full((8, 8, 8), np.nan),
                                 np.zeros((8, 8, 8))])
def test_template_from_t1_rejects_bad_volumes(bad):
    with pytest.raises(ValueError, match="T1 template"):
        template_from_t1(bad)


def test_vary_anatomy_changes_tissue_shapes_and_contrast():
    labels, t1 = phantom()
    probabilities = np.eye(4, dtype=np.float32)[labels]
    template = {"t1": t1.astype(np.float32), "probabilities": probabilities,
                "labels": labels}
    first = vary_anatomy(template, np.random.default_rng(0))
    again = vary_anatomy(template, np.random.default_rng(0))
    other = vary_anatomy(template, np.random.default_rng(1))
    np.testing.assert_array_equal(first["t1"], again["t1"])          # seeded
    assert not np.array_equal(first["t1"], other["t1"])
    # The brain outline is kept (background untouched), tissue maps stay a partition.
    np.testing.assert_array_equal(first["labels"] > 0, labels > 0)
    np.testing.assert_allclose(first["probabilities"].sum(-1), 1.0, atol=1e-5)
    assert first["t1"].min() >= 0.0 and first["t1"].max() <= 1.0
    # Hard one-hot maps keep their labels; soft maps move boundaries.
    soft = dict(template, probabilities=(0.4 * probabilities + 0.2).astype(np.float32))
    soft["probabilities"][labels == 0] = [1, 0, 0, 0]
    moved = [vary_anatomy(soft, np.random.default_rng(seed))["labels"]
             for seed in range(4)]
    assert any(np.mean(m != labels) > 0.01 for m in moved)


def test_build_demo_with_varied_anatomy_and_a_held_out_template(tmp_path):
    from aldk_tf.data import load_dataset_config, load_pair
    from aldk_tf.data.demo_set import build_demo
    _, t1 = phantom(48)
    # A held-out "template": the phantom as a NIfTI in MNI-like mm coordinates.
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -48.0
    path = tmp_path / "phantom_t1.nii.gz"
    nib.save(nib.Nifti1Image((t1 * 1000).astype(np.float32), affine), path)
    config = load_dataset_config(build_demo(tmp_path / "demo", size=16, seed=0,
                                            subjects=6, validation=2, test=2, log=None,
                                            vary=True, test_template=path))
    description = config.extra["description"]
    assert "anatomy varied" in description and "phantom_t1" in description
    test_pair = load_pair(config, "demo/subject_04", "demo/subject_05")
    train_pair = load_pair(config, "demo/subject_00", "demo/subject_01")
    # Test subjects are the sphere phantom; training ones the ICBM brain.
    for pair in (test_pair, train_pair):
        assert set(np.unique(pair["fixed_seg"])) <= {0, 1, 2, 3}
    assert np.mean(test_pair["fixed_seg"] > 0) != pytest.approx(
        np.mean(train_pair["fixed_seg"] > 0), abs=0.01)

    # The first test subjects as NIfTI: the stored arrays on the stored world grid.
    from aldk_tf.data.demo_set import write_nifti_subjects
    written = write_nifti_subjects(tmp_path / "demo" / "demo.json", tmp_path / "nifti")
    assert [p.name for p in written] == ["subject_04_t1.nii.gz", "subject_04_seg.nii.gz",
                                         "subject_05_t1.nii.gz", "subject_05_seg.nii.gz"]
    image, labels = nib.load(written[0]), nib.load(written[1])
    np.testing.assert_array_equal(np.asarray(labels.dataobj)[..., None],
                                  test_pair["fixed_seg"])
    np.testing.assert_allclose(np.asarray(image.dataobj)[..., None] / 255.0,
                               test_pair["fixed"], atol=1e-6)
    assert not np.allclose(image.affine, np.eye(4))


def test_training_groups_pair_subjects_only_within_their_group():
    from aldk_tf.data.demo_set import training_subsets
    entries = [f"demo/s{index}" for index in range(11)]
    groups = training_subsets(entries, 4)
    # Consecutive groups of four; the remainder of three forms its own group.
    assert [len(group) for group in groups.values()] == [4, 4, 3]
    assert sum(groups.values(), []) == entries
    # A remainder of one cannot be paired: it joins the previous group.
    assert [len(g) for g in training_subsets(entries[:9], 4).values()] == [4, 5]
    assert training_subsets(entries, 0) == {"demo-train": entries}
    from aldk_tf.data import DatasetConfig
    from aldk_tf.data.pairs import list_pairs
    config = DatasetConfig(files={}, subsets=groups,
                           schemes={"1": {name: 1.0 for name in groups}})
    pairs = list_pairs(config, "1")
    assert len(pairs) == 12 + 12 + 6
    assert all(any(f in g and m in g for g in groups.values()) for f, m in pairs)
