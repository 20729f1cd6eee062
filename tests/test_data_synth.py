"""The pair generator (aldk_tf/data/synth.py): determinism, statistics, labels."""

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from aldk_tf import spatial
from aldk_tf.data import synth
from aldk_tf.data.synth import GeneratorSettings

SIZE = 24


def ball_template(size=SIZE):
    """A synthetic 'brain': a ball of WM inside GM inside CSF (soft maps), T1 from them."""
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1)
    radius = np.linalg.norm(grid - (size - 1) / 2.0, axis=-1) / (size / 2.0)
    wm = 1.0 / (1.0 + np.exp((radius - 0.35) * 30))
    brain = 1.0 / (1.0 + np.exp((radius - 0.85) * 30))
    gm = np.clip(1.0 / (1.0 + np.exp((radius - 0.6) * 30)) - wm, 0, 1)
    csf = np.clip(brain - wm - gm, 0, 1)
    probabilities = np.stack([1 - brain, csf, gm, wm], -1).astype(np.float32)
    t1 = probabilities @ np.array([0.0, 0.2, 0.55, 0.9], np.float32)
    return {"t1": t1, "probabilities": probabilities}


@pytest.fixture(scope="module")
def template():
    return ball_template()


def first_batch(template, settings, seed=0, start=0, batch=2):
    return next(iter(synth.pair_stream(template, settings, batch, seed=seed,
                                       start_pair=start)))


def test_same_seed_same_pairs_and_resume_starts_at_its_pair(template):
    settings = GeneratorSettings()
    stream = synth.pair_stream(template, settings, 2, seed=3)
    a, b = next(iter(stream)), next(iter(stream))
    resumed = first_batch(template, settings, seed=3, start=1, batch=1)
    other = first_batch(template, settings, seed=4, start=0, batch=2)
    for key in a:
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
        np.testing.assert_array_equal(a[key].numpy()[1], resumed[key].numpy()[0])
    assert not np.allclose(a["moving"].numpy(), other["moving"].numpy())
    # every pair new, and the two scans of a pair differ
    assert not np.allclose(a["fixed"].numpy()[0], a["fixed"].numpy()[1])
    assert not np.allclose(a["fixed"].numpy()[0], a["moving"].numpy()[0])


@pytest.mark.parametrize("source", ["synth", "real", "mixed"])
def test_elements_are_images_in_unit_range_with_one_hot_labels(template, source):
    batch = first_batch(template, GeneratorSettings(source=source), batch=2)
    for role in ("fixed", "moving"):
        image, labels = batch[role].numpy(), batch[f"{role}_labels"].numpy()
        assert image.shape == (2, SIZE, SIZE, SIZE, 1) and image.dtype == np.float32
        assert np.isfinite(image).all() and image.min() >= 0 and image.max() <= 1
        assert labels.shape == (2, SIZE, SIZE, SIZE, 4)
        np.testing.assert_array_equal(labels.sum(-1), 1.0)
        # skull-stripped: zero away from the brain (soft at its edge), the brain not blank
        background = labels[..., 0] == 1
        far = ndimage.binary_erosion(background, np.ones((1, 5, 5, 5)))
        assert far.any() and image[..., 0][far].max() < 0.01
        assert image[..., 0][~background].std() > 0.02
        # all four tissue classes present in every scan
        assert (labels.sum(axis=(1, 2, 3)) > 0).all()


def test_real_intensities_follow_the_template_contrast(template):
    """With the template's T1, mean intensity rises CSF < GM < WM (its ordering) in most
    scans; synthesised contrast draws each label's mean independently."""
    batch = first_batch(template, GeneratorSettings(source="real", gamma_std=0.0), batch=4)
    ordered = 0
    for role in ("fixed", "moving"):
        images, labels = batch[role].numpy()[..., 0], batch[f"{role}_labels"].numpy()
        for image, label in zip(images, labels):
            means = [image[label[..., k] == 1].mean() for k in (1, 2, 3)]
            ordered += means[0] < means[1] < means[2]
    assert ordered == 8


def test_labels_are_the_image_structures(template):
    """Synthesised images: the per-label intensities of the image drawn from the label
    map separate the labels (between-label variance dominates within-label variance)."""
    batch = first_batch(template, GeneratorSettings(source="synth", max_noise=0.0,
                                                    max_blur=0.0), batch=2)
    image, labels = batch["fixed"].numpy()[0, ..., 0], batch["fixed_labels"].numpy()[0]
    classes = np.argmax(labels, -1)
    inside = classes > 0
    means = ndimage.mean(image, classes, index=[1, 2, 3])
    within = np.mean([image[classes == k].var() for k in (1, 2, 3)])
    between = np.var(np.asarray(means)[classes[inside] - 1])
    assert between > within


def test_deformations_are_large_smooth_and_invertible():
    settings = GeneratorSettings()
    magnitudes, folding = [], []
    for index in range(4):
        seed = tf.constant([0, index], tf.int64)
        flow = synth.random_deformation(seed, 32, settings)
        assert flow.shape == (1, 32, 32, 32, 3)
        magnitudes.append(float(tf.reduce_mean(tf.norm(flow, axis=-1))))
        folding.append(float(tf.reduce_mean(
            tf.cast(spatial.jacobian_determinant(flow) <= 0, tf.float32))))
    # several voxels of mean displacement at 32^3, no folding (a diffeomorphism)
    assert 0.8 < np.mean(magnitudes) < 6.0
    assert max(folding) < 1e-3


def test_smooth_field_statistics():
    field = synth.smooth_field(tf.constant([1, 2], tf.int64), 32, 4, 200, 0.5).numpy()
    # interpolating spline through N(0, 0.5) controls: mean ~0, std near the controls'
    assert abs(field.mean()) < 0.05
    assert 0.3 < field.std() < 0.6
    # smooth: neighbours differ by far less than the field's spread
    assert np.abs(np.diff(field, axis=1)).mean() < 0.2 * field.std()


def test_blur_matches_scipy():
    rng = np.random.default_rng(0)
    volume = rng.random((1, 20, 20, 20, 1)).astype(np.float32)
    sigmas = np.array([1.0, 0.0, 0.6], np.float32)
    ours = synth.blur(tf.constant(volume), tf.constant(sigmas)).numpy()[0, ..., 0]
    expected = volume[0, ..., 0]
    for axis, sigma in enumerate(sigmas):
        if sigma >= 0.2:
            expected = ndimage.gaussian_filter1d(expected, sigma, axis=axis,
                                                 mode="reflect", truncate=4.0 / sigma)
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_random_shapes_give_more_labels_inside_the_brain(template):
    settings = GeneratorSettings(shapes=1.0, shape_labels=6)
    batch = first_batch(template, settings, batch=1)
    labels = batch["fixed_labels"].numpy()[0]
    assert labels.shape[-1] == 7
    present = labels.sum(axis=(0, 1, 2)) > 0
    assert present.sum() >= 5          # several random shapes survive the deformation
    np.testing.assert_array_equal(labels.sum(-1), 1.0)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="source"):
        GeneratorSettings(source="t2")
    with pytest.raises(ValueError, match="shapes"):
        GeneratorSettings(shapes=1.5)
    assert GeneratorSettings.from_dict(GeneratorSettings(shapes=0.2).to_dict()) == \
        GeneratorSettings(shapes=0.2)


def test_demo_subjects_above_64_are_deformed_at_64_and_upsampled():
    """Subjects larger than 64^3 (e.g. --size 128) integrate their deformation at 64^3:
    the same parameters in voxels of each size give the same field, scaled."""
    from aldk_tf.data.demo_set import deformation, random_deformation_parameters
    parameters = random_deformation_parameters(np.random.default_rng(0), 64)
    small = deformation(parameters["control"], parameters["matrix"], parameters["shift"],
                        64)
    large = deformation(parameters["control"] * 2, parameters["matrix"],
                        parameters["shift"] * 2, 128)
    assert large.shape == (1, 128, 128, 128, 3)
    np.testing.assert_allclose(large.numpy(), spatial.upsample_flow(small, 2).numpy(),
                               atol=1e-3)
    assert float(tf.reduce_mean(tf.abs(large))) > 1.5 * float(tf.reduce_mean(tf.abs(small)))
