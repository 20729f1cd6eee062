"""Runs for tests/test_distribute.py in a fresh process (logical CPU devices can only be
made before TensorFlow starts).

    python tests/distribute_helper.py <dataset.json> <work dir>

splits the CPU into two logical devices, then trains the plain student and the ALDK
student a few steps on one device and under MirroredStrategy over the two (same global
batch and seed), resumes the mirrored ALDK run without a strategy, and prints the
per-step histories, the largest difference of the final weights and the seconds each
run took as JSON on the last line of stdout.
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from aldk_tf.training import distribute  # noqa: E402

STEPS = 3


def main(dataset: str, work: str) -> None:
    mirrored = distribute.make_strategy(cpu_replicas=2)
    one_device = distribute.make_strategy()
    from aldk_tf.training.checkpoints import save_weights_atomic
    from aldk_tf.config import ALDKConfig, ModelConfig, RunConfig, TeacherConfig, TrainConfig
    from aldk_tf.training.run import train

    image_size = (16, 16, 16)
    teacher_dir = os.path.join(work, "teacher")
    teacher_config = RunConfig(dataset=dataset, model=ModelConfig(
        role="teacher", base="vtn", affine="vtn", image_size=image_size))
    teacher_config.save(teacher_dir)
    save_weights_atomic(teacher_config.model.build(), teacher_dir)

    # round=1: every step is a Keras epoch, so the history holds per-step values (and
    # every step starts a new fit call, which must continue the batch stream exactly).
    def config(aldk: bool, steps: int):
        return RunConfig(
            dataset=dataset, model=ModelConfig(image_size=image_size),
            train=TrainConfig(batch=2, round=1, epochs=steps, lr=1e-3, seed=3,
                              checkpoint_every=1, validate_every=0),
            aldk=ALDKConfig(enabled=aldk, adversarial_period=2, critic_period=2,
                            critic_lr=1e-3),
            teacher=TeacherConfig(run=teacher_dir if aldk else None))

    results, seconds = {}, {}

    def timed(name, *args, **kwargs):
        begin = time.perf_counter()
        result = train(*args, verbose=0, **kwargs)
        seconds[name] = round(time.perf_counter() - begin, 1)
        return result

    for kind, aldk in (("student", False), ("aldk", True)):
        # ALDK: the mirrored run's checkpoint is then continued without a strategy.
        total = STEPS + 1 if aldk else STEPS
        runs = {"single": timed(f"{kind} single", config(aldk, total),
                                os.path.join(work, f"{kind}-1"), strategy=one_device)}
        mirrored_dir = os.path.join(work, f"{kind}-2")
        runs["mirrored"] = timed(f"{kind} mirrored", config(aldk, total), mirrored_dir,
                                 max_steps=STEPS, strategy=mirrored)
        if aldk:
            runs["resumed"] = timed(f"{kind} resumed", config(aldk, total), mirrored_dir,
                                    strategy=one_device)
        # Final weights: the student runs end at the same step, the ALDK ones after resume.
        results[kind] = runs
        results[f"{kind} weights max difference"] = max_difference(
            os.path.join(work, f"{kind}-1"), mirrored_dir)
    results["seconds"] = seconds
    print(json.dumps(results))


def max_difference(run_a: str, run_b: str) -> float:
    from aldk_tf.training import runs
    (_, a), (_, b) = runs.load_model(run_a), runs.load_model(run_b)
    return max(float(abs(x - y).max()) for x, y in zip(a.get_weights(), b.get_weights()))


if __name__ == "__main__":
    main(*sys.argv[1:])
