"""The trainers' shared bookkeeping (training/trainer.py's BuiltTrainer): the names they log
and how quantities that exist only on some steps are averaged."""

import keras
import numpy as np
import pytest

from aldk_tf.config import ALDKConfig, LossWeights
from aldk_tf.networks import build_student
from aldk_tf.networks.critic import FlowCritic
from aldk_tf.training.aldk import ALDKTrainer
from aldk_tf.training.trainer import RegistrationTrainer

SIZE = (16, 16, 16)
TERMS = ["similarity", "smoothness", "det", "ortho"]


def batch(rng):
    return {"fixed": rng.random((2, *SIZE, 1)).astype(np.float32),
            "moving": rng.random((2, *SIZE, 1)).astype(np.float32),
            "teacher_flow": rng.normal(0, 1, (2, *SIZE, 3)).astype(np.float32)}


def aldk_trainer(flow_weight=0.0):
    keras.utils.set_random_seed(0)
    trainer = ALDKTrainer(build_student(SIZE), FlowCritic(SIZE), LossWeights(),
                          ALDKConfig(enabled=True, adversarial_period=2, critic_period=2,
                                     flow_weight=flow_weight))
    trainer.compile(g_optimizer=keras.optimizers.Adam(1e-3),
                    d_optimizer=keras.optimizers.Adam(1e-3))
    return trainer


@pytest.mark.parametrize("flow_weight", [0.0, 0.5])
def test_trainers_log_the_names_tensorboard_and_history_show(rng, flow_weight):
    distill = ["flow_distill"] if flow_weight else []
    plain = RegistrationTrainer(build_student(SIZE), LossWeights(), flow_weight=flow_weight)
    plain.compile(optimizer=keras.optimizers.Adam(1e-3))
    aldk = aldk_trainer(flow_weight)
    expected = {plain: ["loss", *TERMS, *distill],
                aldk: ["loss", "rec", "dis", "critic", "gp", "adversarial", *TERMS, *distill]}
    for trainer, names in expected.items():
        assert [metric.name for metric in trainer.metrics] == names
        assert list(trainer.train_step(batch(rng))) == names


def test_adversarial_quantities_average_over_the_steps_that_have_them(rng):
    trainer = aldk_trainer()
    first = trainer.train_step(batch(rng))                # step 0: adversarial + critic
    second = trainer.train_step(batch(rng))               # step 1: neither
    assert float(first["adversarial"]) == 1.0 and float(second["adversarial"]) == 0.5
    for name in ("dis", "critic", "gp"):
        assert float(first[name]) != 0.0, name
        assert float(second[name]) == pytest.approx(float(first[name])), name
    assert float(second["loss"]) != pytest.approx(float(first["loss"]))
