"""Training: loss trends, resume, kill + resume, teacher flows, and the CLI's errors."""

import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from aldk_tf.training import runs
from aldk_tf.training.aldk import ALDKTrainer
from aldk_tf.training.checkpoints import save_weights_atomic
from aldk_tf.config import (ALDKConfig, LossWeights, ModelConfig, RunConfig, TeacherConfig,
                            TrainConfig)
from aldk_tf.networks.critic import FlowCritic
from aldk_tf.data import list_pairs, load_dataset_config, load_pair
from aldk_tf.networks import build_student, build_teacher
from aldk_tf.training.flow_store import TeacherFlowStore, flows_path, stored_keys
from aldk_tf.training.teacher_flows import extract_teacher_flows
from aldk_tf.training.run import train
from aldk_tf.training.trainer import RegistrationTrainer, network_inputs

from synthetic import write_blob_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = (32, 32, 32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_blob_dataset(str(tmp_path_factory.mktemp("data")), size=32)


def fixed_batches(dataset_path, count=2):
    config = load_dataset_config(dataset_path)
    pairs = [load_pair(config, f, m) for f, m in list_pairs(config, "1")[:count]]
    return {key: np.stack([p[key] for p in pairs]) for key in ("fixed", "moving")}


def trend_down(values, window=5):
    values = np.asarray(values)
    return values[-window:].mean() < values[:window].mean()


def test_student_losses_finite_and_decreasing(dataset):
    keras.utils.set_random_seed(0)
    batch = fixed_batches(dataset)
    trainer = RegistrationTrainer(build_student(SIZE), LossWeights())
    trainer.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = {k: [] for k in ("loss", "similarity", "smoothness", "det", "ortho")}
    step = tf.function(trainer.train_step)
    for _ in range(25):
        logs = step(batch)
        for key in history:
            history[key].append(float(logs[key]))
        for tracker in trainer.metrics:
            tracker.reset_state()
    for key, values in history.items():
        assert np.all(np.isfinite(values)), key
    # The objective and the image term fall; smoothness starts at zero with a zero flow
    # and can only grow as the flow appears, so it is checked for finiteness only.
    assert trend_down(history["loss"]) and trend_down(history["similarity"])


def aldk_history(dataset, critic_lr, steps=24, gamma=0.3):
    keras.utils.set_random_seed(0)
    batch = fixed_batches(dataset)
    teacher = build_teacher(SIZE, n_cascades=1)
    batch["teacher_flow"] = np.asarray(teacher(batch)["flow"]) + np.float32(1.0)
    trainer = ALDKTrainer(build_student(SIZE), FlowCritic(SIZE), LossWeights(),
                          ALDKConfig(enabled=True, adversarial_period=1, critic_period=1,
                                     gamma=gamma))
    trainer.compile(g_optimizer=keras.optimizers.Adam(1e-3),
                    d_optimizer=keras.optimizers.Adam(critic_lr))
    history = {k: [] for k in ("loss", "rec", "dis", "critic", "gp", "similarity",
                               "smoothness", "det", "ortho")}
    step = tf.function(trainer.train_step)
    for _ in range(steps):
        logs = step(batch)
        for key in history:
            history[key].append(float(logs[key]))
        for tracker in trainer.metrics:
            tracker.reset_state()
    for key, values in history.items():
        assert np.all(np.isfinite(values)), key
    return history


def test_aldk_student_terms_decrease_against_a_fixed_critic(dataset):
    """With the critic frozen (lr 0), every student term is an ordinary loss: the image
    term and the total must fall, and l_dis when it is the student's whole objective
    (gamma 0; beside l_rec its gradient is small and l_dis may stay flat)."""
    history = aldk_history(dataset, critic_lr=0.0)
    assert trend_down(history["similarity"]) and trend_down(history["loss"])
    assert trend_down(aldk_history(dataset, critic_lr=0.0, gamma=0.0)["dis"])


def test_aldk_critic_objective_decreases(dataset):
    """With the critic learning, its WGAN-GP objective falls. (l_dis then rises: it is
    the gap the critic opens between student and teacher flows, the adversarial game.)"""
    history = aldk_history(dataset, critic_lr=1e-4)
    assert trend_down(history["critic"]) and trend_down(history["similarity"])


def run_config(dataset, **train):
    settings = dict(batch=2, round=6, epochs=2, lr=1e-3, checkpoint_every=2,
                    validate_every=0)
    settings.update(train)
    return RunConfig(dataset=dataset, model=ModelConfig(image_size=SIZE),
                     train=TrainConfig(**settings))


def test_resume_continues_like_an_uninterrupted_run(dataset, tmp_path):
    config = run_config(dataset)
    interrupted, straight = str(tmp_path / "interrupted"), str(tmp_path / "straight")
    train(config, interrupted, verbose=0, max_steps=4)
    _, half = runs.load_model(interrupted)
    train(runs.load_run_config(interrupted), interrupted, verbose=0, max_steps=9)
    train(config, straight, verbose=0, max_steps=9)
    _, resumed = runs.load_model(interrupted)
    _, reference = runs.load_model(straight)
    assert not all(np.array_equal(a, b) for a, b in zip(half.get_weights(),
                                                        resumed.get_weights()))
    for a, b in zip(resumed.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, atol=2e-5)
    for run_dir in (interrupted, straight):
        latest = tf.train.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
        assert latest.endswith("ckpt-9")


@pytest.mark.slow
def test_sigkill_loses_at_most_one_checkpoint_interval(dataset, tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    command = [sys.executable, os.path.join(ROOT, "train.py"), "-b", "LDR", "-d", dataset,
               "--batch", "1", "--round", "1000", "--epochs", "1", "--output", "killed",
               "--weights-dir", str(tmp_path), "--checkpoint-every", "2",
               "--validate-every", "0", "--verbose", "0"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not list(checkpoints.glob("ckpt-4.index")):
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = tf.train.latest_checkpoint(str(checkpoints))
    assert saved is not None
    saved_step = int(saved.rsplit("-", 1)[1])
    assert saved_step >= 4
    resume = subprocess.run(command[:2] + ["-c", str(tmp_path / "killed"), "--max-steps",
                                           str(saved_step + 2), "--verbose", "0"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert resume.returncode == 0, resume.stderr[-2000:]
    latest = tf.train.latest_checkpoint(str(checkpoints))
    assert latest.endswith(f"ckpt-{saved_step + 2}")


def make_teacher_run(folder, dataset, image_size=SIZE):
    config = RunConfig(dataset=dataset, model=ModelConfig(
        role="teacher", base="vtn", affine="vtn", image_size=image_size))
    config.save(folder)
    teacher = config.model.build()
    save_weights_atomic(teacher, folder)
    return teacher


def test_teacher_flow_extraction_resumes_and_matches(dataset, tmp_path):
    teacher_dir = str(tmp_path / "teacher")
    teacher = make_teacher_run(teacher_dir, dataset)
    config = load_dataset_config(dataset)
    pairs = list_pairs(config, "1")[:4]
    path = flows_path(teacher_dir)
    assert extract_teacher_flows(teacher, config, pairs[:2], path, progress=False) == 2
    assert extract_teacher_flows(teacher, config, pairs, path, progress=False) == 2
    assert stored_keys(path) == {f"{f}-{m}" for f, m in pairs}
    store = TeacherFlowStore(path)
    pair = load_pair(config, *pairs[3])
    expected = teacher({"fixed": pair["fixed"][None], "moving": pair["moving"][None]})
    np.testing.assert_allclose(store.read(*pairs[3]), expected["flow"][0], atol=2e-2)
    store.close()


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


def test_cli_errors(dataset, tmp_path):
    missing = run_cli("-b", "LDR", "-d", str(tmp_path / "none.json"))
    assert missing.returncode == 2 and "none.json" in missing.stderr.splitlines()[-1]
    no_teacher = run_cli("-b", "LDR", "-d", dataset, "--aldk", "--teacher",
                         str(tmp_path / "absent"), "--weights-dir", str(tmp_path),
                         "--output", "x")
    assert no_teacher.returncode == 2 and "absent" in no_teacher.stderr.splitlines()[-1]
    assert not (tmp_path / "x").exists()          # nothing half-written
    small = str(tmp_path / "small_teacher")
    make_teacher_run(small, dataset, image_size=(16, 16, 16))
    mismatch = run_cli("-b", "LDR", "-d", dataset, "--aldk", "--teacher", small,
                       "--weights-dir", str(tmp_path), "--output", "y")
    assert mismatch.returncode == 2
    assert "teacher image size" in mismatch.stderr.splitlines()[-1]


def test_cross_resolution_distillation_terms(dataset):
    """The distiller's terms are finite, vanish for a student that reproduces the
    teacher's flow exactly, and training moves both the student and the adapters."""
    from aldk_tf import spatial
    from aldk_tf.training.crd import CrossResolutionDistiller
    keras.utils.set_random_seed(0)
    teacher = build_teacher(SIZE, n_cascades=1)
    student = build_student(SIZE, resolution_factor=2)
    distiller = CrossResolutionDistiller(teacher, student, gate="always")
    batch = fixed_batches(dataset)
    targets = distiller.teacher_targets(batch)
    outputs = student(batch)
    terms = distiller.terms(batch, outputs, targets)
    assert set(terms) == {"crd_flow", "crd_feature", "crd_weight"}
    assert all(np.all(np.isfinite(v)) and np.all(v.numpy() > 0) for v in terms.values())
    np.testing.assert_array_equal(terms["crd_weight"], [1.0, 1.0])
    perfect = {**outputs, "low_flow": spatial.downsample_flow(targets[0], 2)}
    np.testing.assert_allclose(distiller.terms(batch, perfect, targets)["crd_flow"], 0.0,
                               atol=1e-8)

    trainer = RegistrationTrainer(student, LossWeights(), distiller=distiller)
    trainer.compile(optimizer=keras.optimizers.Adam(1e-3))
    adapters_before = [v.numpy().copy() for v in distiller.adapter_variables]
    teacher_before = [v.numpy().copy() for v in teacher.variables]
    logs = trainer.train_step(batch)
    assert np.isfinite(float(logs["crd_feature"])) and np.isfinite(float(logs["loss"]))
    assert float(logs["crd_weight"]) == 1.0                      # reported, not a loss
    total = sum(float(logs[name]) for name in ("similarity", "smoothness", "det", "ortho",
                                               "crd_flow", "crd_feature"))
    np.testing.assert_allclose(float(logs["loss"]), total, rtol=1e-5)
    assert any(not np.array_equal(a, v.numpy())
               for a, v in zip(adapters_before, distiller.adapter_variables))
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(teacher_before,
                                                             teacher.variables))


def test_cross_resolution_gate_keeps_only_pairs_the_teacher_registers_better(dataset):
    """``teacher_better``: a pair is distilled iff the teacher's warp has the lower
    similarity loss than the student's; ``always`` distils every pair."""
    from aldk_tf.training.crd import CrossResolutionDistiller
    from aldk_tf.losses import similarity_loss
    keras.utils.set_random_seed(0)
    teacher = build_teacher(SIZE, n_cascades=1)
    student = build_student(SIZE, resolution_factor=2)
    batch = fixed_batches(dataset)
    gated = CrossResolutionDistiller(teacher, student, gate="teacher_better")
    targets = gated.teacher_targets(batch)
    outputs = dict(student(batch))
    teacher_similarity = targets[2].numpy()
    # Pair 0: the student's warp is the fixed image itself (better than any teacher);
    # the others: the student's warp is noise (worse than the teacher's warp).
    noise = tf.random.stateless_uniform(batch["fixed"].shape, seed=(1, 2))
    outputs["warped"] = tf.concat([batch["fixed"][:1], noise[1:]], axis=0)
    student_similarity = similarity_loss(batch["fixed"], outputs["warped"]).numpy()
    expected = (teacher_similarity < student_similarity).astype(np.float32)
    assert expected[0] == 0 and expected[1:].all()
    np.testing.assert_array_equal(gated.weights(batch, outputs, targets[2]), expected)
    terms = gated.terms(batch, outputs, targets)
    assert terms["crd_flow"][0] == 0 and terms["crd_feature"][0] == 0
    np.testing.assert_array_equal(terms["crd_weight"], expected)
    assert np.all(terms["crd_flow"].numpy()[1:] > 0)
    always = CrossResolutionDistiller(teacher, student, gate="always")
    np.testing.assert_array_equal(always.weights(batch, outputs, targets[2]),
                                  np.ones_like(expected))
    with pytest.raises(ValueError, match="gate"):
        CrossResolutionDistiller(teacher, student, gate="sometimes")


def test_distillation_terms_at_full_resolution_and_bad_factors(dataset):
    """Factor 1 (the control: the same terms without the resolution change) compares
    the student's full-resolution flow and unshifted features; factor 3 is refused."""
    from aldk_tf.training.crd import CrossResolutionDistiller
    keras.utils.set_random_seed(0)
    teacher = build_teacher(SIZE, n_cascades=1)
    student = build_student(SIZE)
    distiller = CrossResolutionDistiller(teacher, student, gate="always")
    assert [a.filters for a in distiller.adapters] == [16, 32, 64]   # conv1, conv2, conv3
    batch = fixed_batches(dataset)
    targets = distiller.teacher_targets(batch)
    outputs = student(batch)
    assert "low_flow" not in outputs
    flow_term = distiller.terms(batch, outputs, targets)["crd_flow"].numpy()
    expected = 0.1 * np.mean((outputs["flow"].numpy() - targets[0].numpy()) ** 2,
                             axis=(1, 2, 3, 4))
    np.testing.assert_allclose(flow_term, expected, rtol=1e-5)
    with pytest.raises(ValueError, match="power-of-2"):
        CrossResolutionDistiller(teacher, build_student((48, 48, 48), resolution_factor=3))


def test_distillation_anneal_schedule_scales_the_terms(dataset):
    """``anneal_steps``: the terms scale by 1 - step / anneal_steps (0 after it)."""
    from aldk_tf.training.crd import CrossResolutionDistiller
    keras.utils.set_random_seed(0)
    teacher = build_teacher(SIZE, n_cascades=1)
    student = build_student(SIZE, resolution_factor=2)
    distiller = CrossResolutionDistiller(teacher, student, gate="always", anneal_steps=100)
    np.testing.assert_allclose([float(distiller.schedule(s)) for s in (0, 25, 100, 250)],
                               [1.0, 0.75, 0.0, 0.0])
    batch = fixed_batches(dataset)
    outputs = student(batch)
    full = distiller.terms(batch, outputs, distiller.teacher_targets(batch, 0))
    quarter = distiller.terms(batch, outputs, distiller.teacher_targets(batch, 75))
    for name in ("crd_flow", "crd_feature"):
        np.testing.assert_allclose(quarter[name], 0.25 * full[name].numpy(), rtol=1e-4)
    assert float(CrossResolutionDistiller(teacher, student).schedule(10 ** 6)) == 1.0


def test_distilled_students_see_the_plain_students_batches(dataset, tmp_path):
    """Fair rows: with stored teacher flows the batches are still augmented, identical to
    the plain student's, and each stored flow is mapped onto its augmented pair."""
    from aldk_tf.training.run import training_dataset
    teacher_dir = str(tmp_path / "teacher")
    teacher = make_teacher_run(teacher_dir, dataset)
    dataset_config = load_dataset_config(dataset)
    path = flows_path(teacher_dir)
    extract_teacher_flows(teacher, dataset_config, list_pairs(dataset_config, "1"), path,
                          progress=False)
    plain = run_config(dataset)
    distilled = run_config(dataset)
    distilled.aldk = ALDKConfig(flow_weight=0.1)
    distilled.teacher = TeacherConfig(run=teacher_dir)
    plain_batches = list(training_dataset(plain, dataset_config, 0, None).take(3))
    distilled_batches = list(training_dataset(distilled, dataset_config, 0, path).take(3))
    unaugmented = run_config(dataset, augment=False)
    raw_batches = list(training_dataset(unaugmented, dataset_config, 0, path).take(3))
    for a, b, raw in zip(plain_batches, distilled_batches, raw_batches):
        np.testing.assert_array_equal(a["moving"].numpy(), b["moving"].numpy())
        np.testing.assert_array_equal(a["fixed"].numpy(), b["fixed"].numpy())
        assert not np.array_equal(a["moving"].numpy(), raw["moving"].numpy())
        # The mapped target differs from the stored one by the augmentation.
        assert np.abs(b["teacher_flow"].numpy() - raw["teacher_flow"].numpy()).max() > 0.1


def test_flow_distillation_term_pulls_the_student_to_the_target(dataset):
    keras.utils.set_random_seed(0)
    batch = fixed_batches(dataset)
    batch["teacher_flow"] = np.full(batch["fixed"].shape[:4] + (3,), 1.5, np.float32)
    histories = {}
    for weight in (0.0, 1.0):
        keras.utils.set_random_seed(0)
        trainer = RegistrationTrainer(build_student(SIZE), LossWeights(), flow_weight=weight)
        trainer.compile(optimizer=keras.optimizers.Adam(1e-3))
        step = tf.function(trainer.train_step)
        for _ in range(15):
            logs = step(batch)
        assert ("flow_distill" in logs) == (weight > 0)
        flow = trainer.network({key: batch[key] for key in ("fixed", "moving")})["flow"].numpy()
        histories[weight] = float(np.mean((flow - 1.5) ** 2))
    assert histories[1.0] < 0.5 * histories[0.0]


def test_cli_flow_distill_needs_a_teacher(dataset, tmp_path):
    result = run_cli("-b", "LDR", "-d", dataset, "--flow-distill", "0.1",
                     "--weights-dir", str(tmp_path), "--output", "z")
    assert result.returncode == 2
    assert "--flow-distill needs --teacher" in result.stderr.splitlines()[-1]
    assert not (tmp_path / "z").exists()


def test_cli_training_options_reach_the_config(dataset, tmp_path):
    from aldk_tf.cli import train as cli
    teacher = str(tmp_path / "teacher")
    config = cli.build_config(cli.parse_args(
        ["-b", "LDR", "-d", dataset, "--clip-norm", "0.5", "--augment-field", "spline",
         "--flow-distill", "0.2", "--refine-targets", "7", "--teacher", teacher,
         "--teacher-rep", "3"]))
    assert config.train.clip_norm == 0.5 and config.train.augment_field == "spline"
    assert config.aldk.flow_weight == 0.2 and config.aldk.refine == 7
    assert config.teacher.rep == 3 and config.teacher.run == teacher
    assert not config.aldk.enabled
    for flag in ("--clip-norm", "--flow-distill", "--refine-targets"):  # train_checks'
        with pytest.raises(ValueError, match=f"^{flag}: expected .*>= 0, got -1"):
            cli.build_config(cli.parse_args(["-b", "LDR", "-d", dataset, flag, "-1"]))


def test_stale_teacher_flows_are_extracted_again(dataset, tmp_path):
    """Flows are keyed by pair id; after the teacher changes they must not be reused."""
    from aldk_tf.training.run import ensure_teacher_flows
    teacher_dir = str(tmp_path / "teacher")
    teacher = make_teacher_run(teacher_dir, dataset)
    config = load_dataset_config(dataset)
    pairs = list_pairs(config, "1")[:3]
    path = ensure_teacher_flows(teacher_dir, teacher, config, pairs)
    store = TeacherFlowStore(path)
    before = store.read(*pairs[0])
    store.close()
    # Same teacher, same data: nothing is redone.
    assert ensure_teacher_flows(teacher_dir, teacher, config, pairs) == path
    assert not os.path.exists(path + ".stale")
    # The teacher trains further: its stored flows are set aside and extracted again.
    for variable in teacher.trainable_variables:       # flow head bias: +0.2 voxel
        if "pred0" in variable.path and "bias" in variable.path:
            variable.assign(variable + 0.01)
    ensure_teacher_flows(teacher_dir, teacher, config, pairs)
    assert os.path.exists(path + ".stale")
    store = TeacherFlowStore(path)
    after = store.read(*pairs[0])
    store.close()
    expected = teacher({key: load_pair(config, *pairs[0])[key][None]
                        for key in ("fixed", "moving")})["flow"][0]
    np.testing.assert_allclose(after, expected, atol=2e-2)
    assert np.abs(after - before).max() > 0.05


def test_repeated_teacher_targets_live_in_their_own_file(dataset, tmp_path):
    """--teacher-rep R: the teacher's cascades applied R times with shared weights give
    other targets, stored beside the as-trained ones; a file made with another R is set
    aside, never read as if it were the asked-for setting."""
    from aldk_tf.training.flow_store import flows_path
    from aldk_tf.training.run import ensure_teacher_flows, load_teacher
    teacher_dir = str(tmp_path / "teacher")
    make_teacher_run(teacher_dir, dataset)
    config = load_dataset_config(dataset)
    pairs = list_pairs(config, "1")[:2]
    once = load_teacher(teacher_dir, SIZE)
    twice = load_teacher(teacher_dir, SIZE, rep=2)
    for variable in twice.trainable_variables:          # a teacher that moves things
        if "pred0" in variable.path and "bias" in variable.path:
            variable.assign(variable + 0.02)
    for variable in once.trainable_variables:
        if "pred0" in variable.path and "bias" in variable.path:
            variable.assign(variable + 0.02)
    path_once = ensure_teacher_flows(teacher_dir, once, config, pairs)
    path_twice = ensure_teacher_flows(teacher_dir, twice, config, pairs)
    assert path_twice == flows_path(teacher_dir, rep=2) != path_once
    inputs = {key: load_pair(config, *pairs[0])[key][None] for key in ("fixed", "moving")}
    for path, model in ((path_once, once), (path_twice, twice)):
        store = TeacherFlowStore(path)
        np.testing.assert_allclose(store.read(*pairs[0]), model(inputs)["flow"][0],
                                   atol=2e-2)
        store.close()
    # A file of the single application under the repeated setting's name is stale.
    os.replace(path_once, path_twice)
    ensure_teacher_flows(teacher_dir, twice, config, pairs)
    assert os.path.exists(path_twice + ".stale")
    store = TeacherFlowStore(path_twice)
    np.testing.assert_allclose(store.read(*pairs[0]), twice(inputs)["flow"][0], atol=2e-2)
    store.close()


def test_validation_writes_dice_and_preview_images_for_tensorboard(dataset, tmp_path):
    from aldk_tf.training.run import ValidationDice, preview_images
    config = load_dataset_config(dataset)
    network = ModelConfig(image_size=SIZE).build()
    callback = ValidationDice(network, config, tf.Variable(4, dtype=tf.int64), every=2,
                              max_pairs=2, log_dir=str(tmp_path))
    callback.on_train_batch_end(0)
    events = [value for path in tmp_path.iterdir()
              for event in tf.compat.v1.train.summary_iterator(str(path))
              for value in event.summary.value]
    tags = {value.tag for value in events}
    assert {"validation/dice", "validation/fixed", "validation/moving",
            "validation/warped", "validation/flow_magnitude"} <= tags
    # The previews are the middle slices of the first validation pair.
    pair = load_pair(config, *list_pairs(config, "2")[0])
    outputs = network({k: pair[k][None] for k in ("fixed", "moving")})
    images = preview_images(pair["fixed"][None], pair["moving"][None], outputs["warped"],
                            outputs["flow"])
    middle = SIZE[0] // 2
    np.testing.assert_allclose(images["fixed"][0], np.clip(pair["fixed"][middle], 0, 1))
    np.testing.assert_allclose(images["warped"][0],
                               np.clip(outputs["warped"][0, middle], 0, 1), atol=1e-6)
    magnitude = np.linalg.norm(outputs["flow"][0, middle], axis=-1)
    np.testing.assert_allclose(images["flow_magnitude"][0, ..., 0],
                               magnitude / max(magnitude.max(), 1e-6), atol=1e-5)
    assert all(image.shape == (1, *SIZE[1:], 1) for image in images.values())


def test_warped_distillation_asks_nothing_where_the_image_is_flat(dataset):
    """The image-level term: zero when the student warps like the teacher; its gradient
    on the student's flow vanishes where the moving image is constant."""
    from aldk_tf import spatial
    from aldk_tf.training.trainer import warped_distillation_loss
    size = 16
    grid = np.indices((size,) * 3).astype(np.float32)
    blob = np.exp(-((grid - 5.0) ** 2).sum(0) / 8.0)            # structure near (5,5,5)
    moving = tf.constant(blob[None, ..., None])
    teacher_flow = tf.constant(np.full((1, size, size, size, 3), 1.0, np.float32))
    same = warped_distillation_loss(moving, teacher_flow,
                                    spatial.warp(moving, teacher_flow))
    student_flow = tf.Variable(tf.zeros_like(teacher_flow))
    with tf.GradientTape() as tape:
        loss = warped_distillation_loss(moving, teacher_flow,
                                        spatial.warp(moving, student_flow))
    gradient = np.abs(tape.gradient(loss, student_flow).numpy()[0]).sum(-1)
    # (1 - Pearson with a small epsilon in the denominator: "same" is not exactly 0.)
    assert float(same[0]) < 0.05 * float(loss[0])
    assert gradient[4:7, 4:7, 4:7].min() > 0           # where the blob has an edge
    assert gradient[12:, 12:, 12:].max() < 1e-6 * gradient.max()     # flat: nothing


def test_gated_warped_distillation_only_where_the_teacher_aligns_better():
    """Per pair: the image-level term where the teacher's warped image is closer to the
    fixed image than the student's, 0 where it is farther; gradient only through the
    student's warped image."""
    from aldk_tf import spatial
    from aldk_tf.losses import similarity_loss
    from aldk_tf.training.trainer import (gated_warped_distillation_loss,
                                          warped_distillation_loss)
    size = 16
    grid = np.indices((size,) * 3).astype(np.float32)
    blob = np.exp(-((grid - 7.0) ** 2).sum(0) / 6.0)[None, ..., None]
    moving = tf.constant(np.concatenate([blob, blob]))
    fixed = spatial.warp(moving, tf.constant(np.full((2, size, size, size, 3), 1.0,
                                                     np.float32)))
    # Pair 0: the teacher has the fixed image's shift and the student none (teacher
    # better); pair 1: the other way round.
    shifts = np.zeros((2, size, size, size, 3), np.float32)
    shifts[0] = 1.0
    teacher_flow = tf.constant(shifts)
    student_flow = tf.Variable(tf.constant(1.0 - shifts))
    with tf.GradientTape() as tape:
        student_warped = spatial.warp(moving, student_flow)
        gated = gated_warped_distillation_loss(fixed, moving, teacher_flow, student_warped)
    plain = warped_distillation_loss(moving, teacher_flow, student_warped)
    teacher_warped = spatial.warp(moving, teacher_flow)
    assert float(similarity_loss(fixed, teacher_warped)[0]) < float(
        similarity_loss(fixed, student_warped)[0])
    np.testing.assert_allclose(float(gated[0]), float(plain[0]), rtol=1e-6)
    assert float(plain[1]) > 0.05 and float(gated[1]) == 0.0
    gradient = tape.gradient(gated, student_flow).numpy()
    assert np.abs(gradient[0]).max() > 0 and np.abs(gradient[1]).max() == 0


def test_online_target_is_the_teachers_flow_refined_per_pair():
    """Generated batches: the distillation target is the teacher's flow, refined by N
    instance-optimisation steps when asked (refine_flow's result), never differentiated."""
    from aldk_tf.training.refine import refine_flow
    from aldk_tf.training.trainer import online_target
    keras.utils.set_random_seed(0)
    size = (16, 16, 16)
    teacher = build_student(size)
    rng = np.random.default_rng(0)
    grid = np.indices(size).astype(np.float32)
    def blob(centre):
        return np.exp(-((grid - np.reshape(centre, (3, 1, 1, 1))) ** 2).sum(0) / 10.0)
    batch = {"fixed": blob([7.0, 8.0, 8.0])[None, ..., None],
             "moving": blob([9.0, 7.0, 8.0])[None, ..., None]}
    batch = {k: tf.constant(v + 0.01 * rng.random(v.shape, np.float32))
             for k, v in batch.items()}
    raw = online_target(teacher, batch)
    expected = teacher(network_inputs(batch), training=False)["flow"]
    np.testing.assert_allclose(raw.numpy(), expected.numpy(), atol=1e-6)
    refined = online_target(teacher, batch, refine=5)
    reference, _ = refine_flow(batch["fixed"], batch["moving"], expected, 5)
    np.testing.assert_allclose(refined.numpy(), reference.numpy(), atol=1e-5)
    assert np.abs(refined.numpy() - raw.numpy()).max() > 1e-3


def test_warped_distillation_trains_the_student_towards_the_target(dataset):
    keras.utils.set_random_seed(0)
    batch = fixed_batches(dataset)
    batch["teacher_flow"] = np.full(batch["fixed"].shape[:4] + (3,), 1.5, np.float32)
    trainer = RegistrationTrainer(build_student(SIZE), LossWeights(), flow_weight=1.0,
                                  flow_target="warped")
    trainer.compile(optimizer=keras.optimizers.Adam(1e-3))
    step = tf.function(trainer.train_step)
    first = float(step(batch)["flow_distill"])
    for _ in range(14):
        logs = step(batch)
    assert float(logs["flow_distill"]) < 0.8 * first


def generated_config(dataset, **train):
    """A student on generated pairs (labels on, soft-Dice term), validated every 2 steps."""
    from aldk_tf.data.synth import GeneratorSettings
    config = run_config(dataset, validate_every=2, validation_pairs=2,
                        generator=GeneratorSettings().to_dict(), **train)
    config.losses = LossWeights(label=1.0)
    return config


def test_generated_pairs_train_validate_and_keep_the_best(dataset, tmp_path):
    import json
    run_dir = str(tmp_path / "generated")
    history = train(generated_config(dataset), run_dir, verbose=0, max_steps=4)
    assert np.all(np.isfinite(history["label"])) and max(history["label"]) <= 1.0
    record = json.load(open(os.path.join(run_dir, "validation.json")))
    assert [step for step, _ in record["history"]] == [2, 4]
    best_step = record["best"]["step"]
    assert record["best"]["dice"] == max(dice for _, dice in record["history"])
    _, best = runs.load_model(run_dir, best=True)
    _, last = runs.load_model(run_dir)
    assert os.path.exists(os.path.join(run_dir, runs.BEST_WEIGHTS_NAME))
    same = all(np.array_equal(a, b) for a, b in zip(best.get_weights(), last.get_weights()))
    assert same == (best_step == 4)


@pytest.mark.slow
def test_generated_run_resumes_like_an_uninterrupted_one(dataset, tmp_path):
    import json
    config = generated_config(dataset)
    interrupted, straight = str(tmp_path / "interrupted"), str(tmp_path / "straight")
    train(config, interrupted, verbose=0, max_steps=3)
    train(runs.load_run_config(interrupted), interrupted, verbose=0, max_steps=6)
    train(config, straight, verbose=0, max_steps=6)
    _, resumed = runs.load_model(interrupted)
    _, reference = runs.load_model(straight)
    for a, b in zip(resumed.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, atol=2e-5)
    records = [json.load(open(os.path.join(d, "validation.json")))
               for d in (interrupted, straight)]
    assert [s for s, _ in records[0]["history"]] == [2, 4, 6]
    np.testing.assert_allclose([d for _, d in records[0]["history"]],
                               [d for _, d in records[1]["history"]], atol=1e-4)


def test_cli_generator_flags_reach_the_config_and_resume_unchanged(dataset, tmp_path):
    from aldk_tf.cli import train as cli
    from aldk_tf.data.synth import GeneratorSettings
    flags = ["--generator", "mixed", "--synth-fraction", "0.7", "--shapes", "0.2",
             "--label-weight", "0.5", "--critic-input", "images"]
    config = cli.build_config(cli.parse_args(["-b", "LDR", "-d", dataset, *flags]))
    assert config.train.generator == GeneratorSettings(source="mixed", synth_fraction=0.7,
                                                       shapes=0.2).to_dict()
    assert config.losses.label == 0.5 and config.aldk.critic_input == "images"
    assert config.preprocessing["crop"] == "nonzero" and config.preprocessing["margin"] == 8
    assert config.preprocessing["intensity"] == "max"
    run_dir = str(tmp_path / "run")
    config.save(run_dir)
    stored = runs.load_run_config(run_dir)
    assert cli.resumed_config(run_dir, stored, flags, override=False) is stored
    with pytest.raises(ValueError, match="train.generator.synth_fraction"):
        cli.resumed_config(run_dir, stored, ["--generator", "mixed", "--synth-fraction",
                                             "0.1"], override=False)
    plain = RunConfig.from_dict({**stored.to_dict(), "train": {
        **stored.to_dict()["train"], "generator": None}})
    plain.save(run_dir)
    changed = cli.resumed_config(run_dir, runs.load_run_config(run_dir), ["--generator",
                                                                          "synth"],
                                 override=True)
    assert changed.train.generator["source"] == "synth"
    for bad, message in ((["--label-weight", "1"], "^--label-weight applies to generated"),
                         (["--shapes", "0.5"], "^--shapes applies to generated"),
                         (["--generator", "real", "--shapes", "2"], "--shapes: expected"),
                         (["--generator", "real", "--label-weight", "-1"],
                          "--label-weight: expected")):
        with pytest.raises(ValueError, match=message):
            cli.build_config(cli.parse_args(["-b", "LDR", "-d", dataset, *bad]))


def test_non_finite_loss_stops_training_before_anything_is_saved(dataset, tmp_path,
                                                                 monkeypatch):
    """A step whose loss is NaN stops the run with one clear error naming the run and
    the step; the NaN state is neither checkpointed nor saved, so the last checkpoint
    (step 2) is what a resumed run starts from."""
    import aldk_tf.training.run as run_module
    run_dir = str(tmp_path / "nan")
    config = run_config(dataset)
    train(config, run_dir, verbose=0, max_steps=2)
    weights = os.path.getmtime(runs.weights_path(run_dir))

    class Exploding(run_module.FusedAdam):        # every update leaves NaN weights
        def update_step(self, gradient, variable, learning_rate):
            variable.assign(variable * np.nan)

    monkeypatch.setattr(run_module, "FusedAdam", Exploding)
    with pytest.raises(runs.RunError, match=r"nan.*became nan at step \d+"):
        train(runs.load_run_config(run_dir), run_dir, verbose=0, max_steps=9)
    latest = tf.train.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    assert latest.endswith("ckpt-2")
    assert os.path.getmtime(runs.weights_path(run_dir)) == weights
    _, model = runs.load_model(run_dir)
    assert all(np.isfinite(w).all() for w in model.get_weights())
