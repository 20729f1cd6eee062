"""Learning-rate schedules: the release's forms, and one schedule for every student."""

import numpy as np
import pytest

from aldk_tf.training.schedules import EpochCosineDecay, EpochStepDecay, release_schedule


def test_step_decay_matches_the_release_table():
    schedule = EpochStepDecay(1e-4, steps_per_epoch=10)
    values = [float(schedule(step)) for step in (0, 15, 25, 35, 45)]
    np.testing.assert_allclose(values, [1e-4, 1e-4, 1e-4, 5e-5, 2.5e-5], rtol=1e-6)


def test_cosine_decay_restarts_and_drops_per_epoch():
    schedule = EpochCosineDecay(1e-4, steps_per_epoch=100, total_steps=500, cycles=5)
    assert float(schedule(0)) == pytest.approx(1e-4)
    assert float(schedule(50)) == pytest.approx(0.5e-4, rel=1e-5)     # half a cycle
    assert float(schedule(100)) == pytest.approx(1e-4 / 8, rel=1e-5)  # epoch 1, restart


@pytest.mark.parametrize("role_is_student, expected", [(True, EpochCosineDecay),
                                                       (False, EpochStepDecay)])
def test_auto_gives_every_student_one_schedule(role_is_student, expected):
    schedule = release_schedule("auto", 1e-4, 100, 500, cosine=role_is_student)
    assert isinstance(schedule, expected)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="auto, step, cosine or constant"):
        release_schedule("linear", 1e-4, 100, 500, cosine=True)
    assert release_schedule("constant", 3e-4, 100, 500, cosine=True) == 3e-4
