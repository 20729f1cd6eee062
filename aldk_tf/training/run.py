"""Running a training job: data, model, trainer, schedules, checkpoints, validation.

``train.py`` and the demo both call :func:`train`; everything a run needs is in its
:class:`RunConfig`, saved beside the weights before the first step. Given a
``tf.distribute`` strategy (:mod:`aldk_tf.training.distribute`), the models, optimizers and
trainers are built in its scope and ``config.train.batch`` is the global batch, split
across the replicas.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from aldk_tf.data import TRAINING_SCHEME, VALIDATION_SCHEME
from aldk_tf.training import distribute, monitor, runs

from aldk_tf import metrics
from aldk_tf.training.aldk import ALDKTrainer
from aldk_tf.training.checkpoints import (CheckpointCallback, RunCheckpoint,
                                          save_weights_atomic)
from aldk_tf.config import RunConfig, atomic_write_text
from aldk_tf.networks.critic import FlowCritic
from aldk_tf.training.crd import CrossResolutionDistiller
from aldk_tf.training.optimizers import FusedAdam
from aldk_tf.training.schedules import release_schedule
from aldk_tf.training.flow_store import (TeacherFlowStore, check_flow_shapes, flows_path,
                                         missing_pairs, provenance, set_aside_if_stale,
                                         teacher_rep)
from aldk_tf.training.teacher_flows import extract_teacher_flows
from aldk_tf.training.trainer import FLOW_TARGETS, RegistrationTrainer

log = logging.getLogger(__name__)

#: What the trainers read from a training batch.
TRAINING_KEYS = ("fixed", "moving", "teacher_flow", "fixed_labels", "moving_labels")
#: The validation record (the best weights: runs.BEST_WEIGHTS_NAME).
VALIDATION_NAME = "validation.json"


def load_teacher(teacher_run: str, image_size, rep: int = 0):
    """The frozen teacher of ``teacher_run``; its image size must equal the student's.
    ``rep`` > 0 applies its cascades that many times with shared weights (0: as it was
    trained)."""
    teacher_config, teacher = runs.load_model(teacher_run, rep=rep or None)
    if tuple(teacher_config.model.image_size) != tuple(image_size):
        raise runs.RunError(
            f"{teacher_run}: teacher image size {tuple(teacher_config.model.image_size)} "
            f"differs from the student's {tuple(image_size)}")
    teacher.trainable = False
    return teacher


def ensure_teacher_flows(teacher_run: str, teacher, dataset_config, pairs,
                         batch_size: int = 1, refine: int = 0) -> str:
    """Extract whatever flows of ``pairs`` (refined by ``refine`` steps) the teacher run
    does not have stored yet."""
    path = flows_path(teacher_run, refine=refine, rep=teacher_rep(teacher))
    fingerprints = provenance(teacher, dataset_config, pairs)    # of every training pair
    reason = set_aside_if_stale(path, fingerprints)
    if reason is not None:
        print(f"{path}: {reason}; moved to {path}.stale", file=sys.stderr)
    todo = missing_pairs(path, pairs)
    if todo:
        print(f"extracting {len(todo)} teacher flows into {path}"
              + (f" (refined, {refine} steps)" if refine else ""), file=sys.stderr)
        extract_teacher_flows(teacher, dataset_config, todo, path, batch_size,
                              refine=refine, fingerprints=fingerprints)
    return path


def teacher_flow_reader(path: str, image_size):
    """A batch map attaching each pair's stored teacher flow (read by pair ids)."""
    store = TeacherFlowStore(path)

    def read(fixed_ids, moving_ids):
        return np.stack([store.read(f.decode(), m.decode())
                         for f, m in zip(fixed_ids.numpy(), moving_ids.numpy())])

    @tf.autograph.experimental.do_not_convert
    def attach(batch):
        flow = tf.py_function(read, [batch["fixed_id"], batch["moving_id"]], tf.float32)
        flow.set_shape([None, *image_size, 3])
        return {**batch, "teacher_flow": flow}

    return attach


def training_dataset(config: RunConfig, dataset_config, start_step: int,
                     teacher_flows: str | None):
    """Infinite training batches, positioned at ``start_step`` for an exact resume.

    Every run with the same seed sees the same pairs in the same order with the same
    augmentation. Stored teacher flows belong to the un-augmented pair; the augmentation
    maps each onto its deformed pair (:func:`aldk_tf.data.augment.augmented_target`), so
    distilled students train on exactly the plain student's batches.
    """
    if config.train.generator is not None:
        return generated_dataset(config, start_step)
    from aldk_tf.data import pair_dataset
    attach = (teacher_flow_reader(teacher_flows, config.model.image_size)
              if teacher_flows is not None else None)
    dataset = pair_dataset(dataset_config, TRAINING_SCHEME, config.train.batch,
                           shuffle=True, seed=config.train.seed,
                           augment=config.train.augment, repeat=True, with_ids=True,
                           drop_remainder=True, attach=attach,
                           augment_field=config.train.augment_field)
    dataset = dataset.map(lambda batch: {key: value for key, value in batch.items()
                                         if key in TRAINING_KEYS})
    if start_step:
        # Replays the pipeline (reading and augmenting, no network) so a resumed run sees
        # exactly the batches an uninterrupted one would.
        dataset = dataset.skip(start_step)
    return dataset


def generated_dataset(config: RunConfig, start_step: int):
    """Infinite batches from the pair generator (:mod:`aldk_tf.data.synth`) on the
    template at the model's size; step ``k`` trains on pairs ``k B .. k B + B - 1``, so a
    resumed run starts there without replaying anything."""
    from aldk_tf.data.demo_set import load_template
    from aldk_tf.data.synth import GeneratorSettings, pair_stream
    size = config.model.image_size
    if len(set(size)) != 1:
        raise runs.RunError(f"the pair generator draws cubes; image_size {tuple(size)} is "
                            f"not one")
    settings = GeneratorSettings.from_dict(config.train.generator)
    return pair_stream(load_template(int(size[0])), settings, config.train.batch,
                       seed=config.train.seed, start_pair=start_step * config.train.batch)


class BatchStream:
    """The training batches as one numbered stream that every ``fit`` call continues.

    Batch ``k`` is the one trained at step ``k``. Keras pulls batches ahead of the step it
    runs (prefetching; under a strategy also one batch to build the model), so a ``fit``
    call ends with batches pulled but never trained on. The stream keeps those until the
    host has seen their step done (:meth:`progress`), and each ``fit`` starts again at
    :meth:`seek`: every batch is trained exactly once, and a resumed run (its source
    positioned at ``start``) sees exactly the batches of an uninterrupted one.
    """

    def __init__(self, dataset: tf.data.Dataset, start: int):
        self.spec = dataset.element_spec
        self.source = iter(dataset)
        self.next_index = start            # index of the source's next batch
        self.pending: dict[int, dict] = {}   # pulled from the source, not yet trained
        self.start = self.trained = start
        self.lock = threading.Lock()       # readers of an abandoned iterator may linger

    def seek(self, step: int) -> None:
        """Start the next iterator at batch ``step`` (the step the next ``fit`` runs)."""
        with self.lock:
            self.start = step
            self._release(step)

    def _release(self, trained: int) -> None:
        self.trained = trained
        for index in [k for k in self.pending if k < trained]:
            del self.pending[index]

    def progress(self, step_variable) -> keras.callbacks.Callback:
        """A callback telling the stream which steps are done (read on the host between
        steps: inside a step the counter may move before the batch is read)."""
        stream = self

        class Progress(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                with stream.lock:
                    stream._release(int(step_variable.numpy()))

        return Progress()

    def batch(self, index: int):
        """Batch ``index``, or None when it has been trained already (a stale reader)."""
        with self.lock:
            if index < self.trained:
                return None
            while self.next_index <= index:
                self.pending[self.next_index] = next(self.source)
                self.next_index += 1
            return self.pending[index]

    def generate(self):
        index = self.start
        while (batch := self.batch(index)) is not None:
            yield batch
            index += 1

    def dataset(self) -> tf.data.Dataset:
        """A dataset each of whose iterators continues the stream at :meth:`seek`.

        Every worker of a multi-worker run builds the same stream and keeps its share of
        each global batch (sharding by data, not by file).
        """
        dataset = tf.data.Dataset.from_generator(self.generate, output_signature=self.spec)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = \
            tf.data.experimental.AutoShardPolicy.DATA
        return dataset.with_options(options)


def preview_images(fixed, moving, warped, flow) -> dict[str, np.ndarray]:
    """Middle slices (along the first array axis) of one registered pair, as TensorBoard
    images ``[1, H, W, 1]`` in [0, 1]: fixed, moving, warped and the flow's magnitude
    (scaled by its maximum, which the tag's description does not need: it is a preview)."""
    def middle(volume):
        volume = np.asarray(volume, np.float32).reshape(np.shape(volume)[-4:])
        return volume[volume.shape[0] // 2]

    images = {name: np.clip(middle(volume), 0.0, 1.0)
              for name, volume in (("fixed", fixed), ("moving", moving),
                                   ("warped", warped))}
    magnitude = np.linalg.norm(middle(flow), axis=-1, keepdims=True)
    images["flow_magnitude"] = magnitude / max(float(magnitude.max()), 1e-6)
    return {name: image[None] for name, image in images.items()}


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stops training with one clear error the first step whose loss is NaN or infinite,
    before anything of that step is checkpointed or saved (it runs first): the run's
    last checkpoint stays the last good state, and a resumed run starts from it."""

    def __init__(self, step_variable, run_dir: str):
        super().__init__()
        self.step_variable, self.run_dir = step_variable, run_dir

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(float(loss)):
            raise runs.RunError(
                f"{self.run_dir}: the training loss became {float(loss)} at step "
                f"{int(self.step_variable.numpy())}; stopped before saving it (the last "
                f"checkpoint is kept). Try a lower --lr or --precision float32.")


class ValidationDice(keras.callbacks.Callback):
    """Mean Dice on the first pairs of the validation scheme every ``every`` steps; with
    a log folder also the Dice scalar and previews of the first pair
    (:func:`preview_images`) for TensorBoard; with a run folder the weights of the best
    Dice so far (``best.weights.h5``) and the record ``validation.json`` (read back on
    resume, so the best survives a kill)."""

    def __init__(self, network, dataset_config, step_variable, every: int, max_pairs: int,
                 log_dir: str | None = None, run_dir: str | None = None):
        super().__init__()
        from aldk_tf.data import list_pairs, load_pair
        self.network, self.every, self.step_variable = network, max(int(every), 1), \
            step_variable
        self.label_values = dataset_config.label_values
        pairs = list_pairs(dataset_config, VALIDATION_SCHEME)[:max_pairs]
        self.pairs = [load_pair(dataset_config, f, m) for f, m in pairs]
        self.writer = tf.summary.create_file_writer(log_dir) if log_dir else None
        self.run_dir = run_dir
        record = read_validation(run_dir) if run_dir else {"history": []}
        self.history: list[tuple[int, float]] = [tuple(h) for h in record["history"]]
        self.best = record.get("best")            # {"step", "dice"} or None
        self.preview: dict[str, np.ndarray] = {}

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.step_variable.numpy())
        if step % self.every == 0 and all(s != step for s, _ in self.history):
            dice = self.evaluate()
            self.history.append((step, dice))
            improved = self.best is None or dice > self.best["dice"]
            if improved and self.run_dir:
                self.best = {"step": step, "dice": dice}
                save_weights_atomic(self.network, self.run_dir, runs.BEST_WEIGHTS_NAME)
            if self.run_dir:
                atomic_write_text(os.path.join(self.run_dir, VALIDATION_NAME),
                                  json.dumps({"history": self.history, "best": self.best,
                                              "pairs": len(self.pairs)}, indent=1) + "\n")
            print(f"\nstep {step}: validation Dice {dice:.4f}"
                  + (" (best so far)" if improved else
                     f" (best {self.best['dice']:.4f} at step {self.best['step']})"
                     if self.best else ""), file=sys.stderr)
            if self.writer is not None:
                # record_if(True): a fit that ended in an error (e.g. a full disk) can
                # leave Keras' TensorBoard recording condition behind in this process.
                with self.writer.as_default(), tf.summary.record_if(True):
                    tf.summary.scalar("validation/dice", self.history[-1][1], step=step)
                    for name, image in self.preview.items():
                        tf.summary.image(f"validation/{name}", image, step=step)
                self.writer.flush()

    def evaluate(self) -> float:
        scores = []
        self.preview = {}
        for pair in self.pairs:
            inputs = {k: pair[k][None] for k in ("fixed", "moving")}
            outputs = self.network(inputs, training=False)
            flow = outputs["flow"]
            if not self.preview:
                self.preview = preview_images(inputs["fixed"], inputs["moving"],
                                              outputs["warped"], flow)
            result = metrics.pair_metrics(pair["fixed_seg"][None], pair["moving_seg"][None],
                                          flow, self.label_values)
            scores.append(result["dice"][0])
        return float(np.nanmean(scores)) if scores else float("nan")


def read_validation(run_dir: str) -> dict:
    """A run's ``validation.json`` (``{"history": [[step, dice], ...], "best": {"step",
    "dice"} | None}``), empty when there is none yet."""
    path = os.path.join(run_dir, VALIDATION_NAME)
    if not os.path.exists(path):
        return {"history": [], "best": None}
    with open(path) as handle:
        return json.load(handle)


def _validation_scheme_exists(dataset_config) -> bool:
    return VALIDATION_SCHEME in dataset_config.schemes


PRECISIONS = ("float32", "bfloat16")


@dataclass
class TrainerParts:
    """What :func:`build_trainer` makes: the compiled trainer and the objects it steps."""
    network: keras.Model
    optimizer: keras.optimizers.Optimizer
    trainer: keras.Model
    critic: keras.Model | None = None
    critic_optimizer: keras.optimizers.Optimizer | None = None
    distiller: CrossResolutionDistiller | None = None


def build_trainer(config: RunConfig, teacher=None, online: bool = False) -> TrainerParts:
    """The network, its optimizer and the compiled trainer of ``config`` (in the current
    strategy's scope): the one construction that :func:`train` runs and
    ``bench/train_step.py`` times. ``teacher``: the frozen teacher for the distillation
    terms; ``online``: the teacher runs on every batch (no stored flows)."""
    from aldk_tf.deploy.inference import use_bfloat16_layers, use_fast_layers
    if config.train.precision not in PRECISIONS:
        raise ValueError(f"train.precision: expected one of {', '.join(PRECISIONS)}, got "
                         f"{config.train.precision!r}")
    generated = config.train.generator is not None
    total_steps = config.train.round * config.train.epochs
    network = use_fast_layers(config.model.build())
    if config.train.precision == "bfloat16":
        use_bfloat16_layers(network)
    if teacher is not None:
        use_fast_layers(teacher)
    schedule = release_schedule(config.train.schedule, config.train.lr,
                                config.train.round, total_steps,
                                cosine=config.model.role == "student")
    optimizer = FusedAdam(schedule, global_clipnorm=config.train.clip_norm or None)
    distiller = None
    if config.crd.enabled:
        # The distiller runs the teacher on every batch, so ALDK uses those flows too.
        distiller = CrossResolutionDistiller(teacher, network, config.crd.flow_weight,
                                             config.crd.feature_weight,
                                             config.crd.levels, config.crd.gate,
                                             config.crd.anneal_steps)
    if config.aldk.enabled:
        critic = FlowCritic(config.model.image_size, output=config.aldk.critic_output,
                            channels=3 if config.aldk.critic_input == "flow" else 2)
        critic_optimizer = FusedAdam(config.aldk.critic_lr)
        trainer = ALDKTrainer(network, critic, config.losses, config.aldk,
                              teacher=teacher if online else None,
                              global_batch_size=config.train.batch,
                              distiller=distiller, seed=config.train.seed)
        trainer.compile(g_optimizer=optimizer, d_optimizer=critic_optimizer)
        return TrainerParts(network, optimizer, trainer, critic, critic_optimizer, distiller)
    trainer = RegistrationTrainer(network, config.losses,
                                  global_batch_size=config.train.batch,
                                  distiller=distiller,
                                  flow_weight=config.aldk.flow_weight,
                                  flow_target=config.aldk.flow_target,
                                  teacher=teacher if generated else None,
                                  refine=config.aldk.refine if generated else 0)
    trainer.compile(optimizer=optimizer)
    optimizer.build(trainer.trainable_weights_to_update())
    return TrainerParts(network, optimizer, trainer, distiller=distiller)


def train(config: RunConfig, run_dir: str, verbose: int | str = "auto",
          max_steps: int | None = None, strategy=None, log_every: int | None = None) -> dict:
    """Train (or resume) the run in ``run_dir``; returns the Keras history dict.

    ``max_steps`` stops early at that global step (used by tests and to split work).
    ``log_every``: steps between two points of the TensorBoard loss curves (default:
    :func:`aldk_tf.training.monitor.log_interval`).
    A ``config`` that differs from the run's saved one is refused unless the change is
    the last entry of its ``history`` (:func:`aldk_tf.training.runs.check_settings`).
    ``strategy`` is a ``tf.distribute.Strategy`` (default: the current one). In a
    multi-worker run only the chief writes the run directory; the other workers take
    part in every checkpoint save but write it to a scratch folder.
    """
    from aldk_tf.data import list_pairs, load_dataset_config
    strategy = strategy or tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    if config.train.batch % replicas:
        raise runs.RunError(f"--batch {config.train.batch} is the global batch; it must "
                            f"be a multiple of the {replicas} replicas")
    chief = distribute.is_chief(strategy)
    if chief:
        runs.check_settings(run_dir, config)      # never silently retrain with others
    keras.utils.set_random_seed(config.train.seed)
    dataset_config = load_dataset_config(config.dataset)
    dataset_config.check_pairs()               # every scheme, validated or not
    dataset_config.validate(check_labels=True, require_segmentation=True)
    if tuple(dataset_config.image_size) != tuple(config.model.image_size):
        raise runs.RunError(
            f"{config.dataset}: image_size {tuple(dataset_config.image_size)} differs "
            f"from the model's {tuple(config.model.image_size)}")
    teacher = None
    config.check_teacher()
    if config.aldk.critic_input not in ("flow", "images"):
        raise ValueError(f"aldk.critic_input: expected 'flow' or 'images', got "
                         f"{config.aldk.critic_input!r}")
    if config.aldk.flow_target not in FLOW_TARGETS:
        raise ValueError(f"aldk.flow_target: expected one of {', '.join(FLOW_TARGETS)}, got "
                         f"{config.aldk.flow_target!r}")
    if config.aldk.enabled or config.aldk.flow_weight > 0 or config.crd.enabled:
        with strategy.scope():
            teacher = load_teacher(config.teacher.run, config.model.image_size,
                                   config.teacher.rep)
    os.makedirs(run_dir, exist_ok=True)

    total_steps = config.train.round * config.train.epochs
    use_aldk = config.aldk.enabled
    generated = config.train.generator is not None
    # Generated pairs have no stored teacher flows: the teacher runs on every batch.
    online = config.aldk.teacher_online or config.crd.enabled or generated
    if config.aldk.flow_weight > 0 and online and not use_aldk and not generated:
        raise runs.RunError("--flow-distill reads stored teacher flows; it cannot be "
                            "combined with --teacher-online or --crd without --aldk")
    flows = None
    if (use_aldk or config.aldk.flow_weight > 0) and not online:
        flows = _shared_teacher_flows(strategy, chief, config.teacher.run, teacher,
                                      dataset_config,
                                      list_pairs(dataset_config, TRAINING_SCHEME),
                                      config.aldk.refine)
    with strategy.scope():            # variables mirrored on every replica
        parts = build_trainer(config, teacher, online)
    network, optimizer, trainer = parts.network, parts.optimizer, parts.trainer
    critic, critic_optimizer, distiller = (parts.critic, parts.critic_optimizer,
                                           parts.distiller)

    checkpoint = RunCheckpoint(run_dir, network, optimizer, critic, critic_optimizer,
                               extra={"adapters": distiller.adapters} if distiller else None,
                               chief=chief)
    start = checkpoint.restore()        # RunError if it does not match the model
    if chief:
        config.save(run_dir)            # after the restore: a refused change leaves it
    end = total_steps if max_steps is None else min(total_steps, max_steps)
    if start >= end:
        print(f"{run_dir}: already at step {start} of {end}; nothing to train",
              file=sys.stderr)
        return {}

    log_dir = os.path.join(run_dir, runs.LOG_DIR)
    callbacks = [StopOnNonFiniteLoss(optimizer.iterations, run_dir),
                 CheckpointCallback(checkpoint, config.train.checkpoint_every, run_dir,
                                    network, write_weights=chief)]
    validation = None
    # On every worker: reading the trackers is a collective under a multi-worker strategy.
    callbacks.append(monitor.LossCurves(log_dir if chief else None, optimizer.iterations,
                                        monitor.log_interval(total_steps, log_every)))
    if chief:
        if _validation_scheme_exists(dataset_config) and config.train.validate_every > 0:
            validation = ValidationDice(network, dataset_config, optimizer.iterations,
                                        config.train.validate_every,
                                        config.train.validation_pairs, log_dir, run_dir)
            callbacks.append(validation)
    else:
        verbose = 0

    # One stream shared by every fit call below (see BatchStream).
    stream = BatchStream(training_dataset(config, dataset_config, start, flows), start)
    callbacks.append(stream.progress(optimizer.iterations))
    callbacks.append(monitor.EpochProgress(config.train.epochs))
    batches = stream.dataset()
    history: dict[str, list] = {}
    epoch, step = start // config.train.round, start
    while step < end:
        # One Keras epoch per release epoch ("round" steps); a resumed or capped run
        # does only the part of the epoch that is left.
        steps = min((epoch + 1) * config.train.round, end) - step
        stream.seek(step)
        with monitor.quiet_training_graph():
            result = trainer.fit(batches, epochs=epoch + 1, initial_epoch=epoch,
                                 steps_per_epoch=steps, callbacks=callbacks,
                                 verbose=verbose, shuffle=False)
        for key, values in result.history.items():
            history.setdefault(key, []).extend(values)
        step += steps
        epoch += 1
    if validation is not None:
        history["validation_dice"] = validation.history
    return history


def _shared_teacher_flows(strategy, chief: bool, teacher_run: str, teacher,
                          dataset_config, pairs, refine: int = 0) -> str:
    """The stored teacher flows of ``pairs``, extracted first where missing: by the chief
    of a multi-worker run, whose other workers wait for it and read the same file."""
    if chief:
        ensure_teacher_flows(teacher_run, teacher, dataset_config, pairs, refine=refine)
    distribute.barrier(strategy)
    path = flows_path(teacher_run, refine=refine, rep=teacher_rep(teacher))
    if not chief and missing_pairs(path, pairs):
        raise runs.RunError(f"{path}: the chief's teacher flows are not visible to this "
                            f"worker; put weights/ on a filesystem all workers share")
    check_flow_shapes(path, dataset_config.image_size)    # before a step reads one
    return path
