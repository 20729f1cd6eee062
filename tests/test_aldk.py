import numpy as np
import pytest
import tensorflow as tf

import keras

from aldk_tf.training.aldk import ALDKTrainer
from aldk_tf.config import ALDKConfig, LossWeights
from aldk_tf.networks.critic import FlowCritic
from aldk_tf.networks import build_student, build_teacher

SIZE = (16, 16, 16)


def snapshot(variables):
    return [v.numpy().copy() for v in variables]


def changed(before, variables):
    return any(not np.array_equal(b, v.numpy()) for b, v in zip(before, variables))


@pytest.fixture
def trainer(rng):
    keras.utils.set_random_seed(0)
    teacher = build_teacher(SIZE, n_cascades=1)
    model = ALDKTrainer(build_student(SIZE), FlowCritic(SIZE), LossWeights(),
                        ALDKConfig(enabled=True, adversarial_period=2, critic_period=2,
                                   adversarial_until=5),
                        teacher=teacher)
    model.compile(g_optimizer=keras.optimizers.Adam(1e-3),
                  d_optimizer=keras.optimizers.Adam(1e-3))
    return model


def batch(rng, teacher_flow=True):
    data = {"fixed": rng.random((2, *SIZE, 1)).astype(np.float32),
            "moving": rng.random((2, *SIZE, 1)).astype(np.float32)}
    if teacher_flow:
        data["teacher_flow"] = rng.normal(0, 1, (2, *SIZE, 3)).astype(np.float32)
    return data


def test_schedule_follows_algorithm_1(trainer):
    adversarial, critic = zip(*[(bool(a), bool(c)) for a, c in
                                (trainer.schedule(tf.constant(s, tf.int64))
                                 for s in range(8))])
    assert adversarial == (True, False, True, False, True, False, False, False)
    assert critic == adversarial


def test_critic_step_changes_only_the_critic(trainer, rng):
    data = batch(rng)
    student, critic = trainer.student.trainable_variables, trainer.critic.trainable_variables
    before_student, before_critic = snapshot(student), snapshot(critic)
    flow = trainer.student({"fixed": data["fixed"], "moving": data["moving"]})["flow"]
    trainer.critic_update(tf.constant(data["teacher_flow"]), flow)
    assert changed(before_critic, critic)
    assert not changed(before_student, student)


def test_student_step_changes_only_the_student(trainer, rng):
    data = batch(rng)
    student, critic = trainer.student.trainable_variables, trainer.critic.trainable_variables
    before_student, before_critic = snapshot(student), snapshot(critic)
    trainer.student_update(data, tf.constant(data["teacher_flow"]), tf.constant(True))
    assert changed(before_student, student)
    assert not changed(before_critic, critic)


def test_teacher_never_changes_and_steps_count(trainer, rng):
    teacher_before = snapshot(trainer.teacher.variables)
    critic_before = snapshot(trainer.critic.trainable_variables)
    data = tf.data.Dataset.from_tensors(batch(rng, teacher_flow=False)).repeat(3)
    history = trainer.fit(data, epochs=1, verbose=0)
    assert not changed(teacher_before, trainer.teacher.variables)
    assert changed(critic_before, trainer.critic.trainable_variables)
    assert int(trainer.step) == 3 and int(trainer.d_optimizer.iterations) == 2
    for name in ("loss", "rec", "dis", "critic", "gp"):
        assert np.isfinite(history.history[name][-1])
    assert history.history["adversarial"][-1] == pytest.approx(2 / 3)


def test_image_critic_judges_the_fixed_image_beside_the_warped_moving_image(rng):
    """critic_input "images": the critic sees [fixed, moving warped by the flow]; a step
    trains the critic on those and the student's update reaches it through the warp."""
    from aldk_tf import spatial
    keras.utils.set_random_seed(0)
    critic = FlowCritic(SIZE, channels=2)
    assert critic.input_shape == (None, *SIZE, 2)
    assert FlowCritic.from_config(critic.get_config()).channels == 2
    model = ALDKTrainer(build_student(SIZE), critic, LossWeights(),
                        ALDKConfig(enabled=True, critic_input="images",
                                   adversarial_period=1, critic_period=1))
    model.compile(g_optimizer=keras.optimizers.Adam(1e-3),
                  d_optimizer=keras.optimizers.Adam(1e-3))
    data = batch(rng)
    view = model.critic_view(data, tf.constant(data["teacher_flow"])).numpy()
    np.testing.assert_array_equal(view[..., :1], data["fixed"])
    np.testing.assert_allclose(view[..., 1:], spatial.warp(data["moving"],
                                                           data["teacher_flow"]).numpy())
    before_student, before_critic = (snapshot(model.student.trainable_variables),
                                     snapshot(critic.trainable_variables))
    logs = model.train_step(data)
    assert np.isfinite(float(logs["dis"])) and float(logs["dis"]) > 0
    assert changed(before_critic, critic.trainable_variables)
    assert changed(before_student, model.student.trainable_variables)
