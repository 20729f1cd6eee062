"""Devices and ``tf.distribute`` strategies for training (``train.py -g/--strategy``).

- ``-g 0,1`` (the release's flag): ``MirroredStrategy`` over those GPUs; ``--batch`` is the
  global batch, split evenly across them. ``-g -1``: the CPU only (GPUs hidden), no
  strategy. Without ``-g``: TensorFlow's default device, no strategy.
- ``--strategy multiworker``: ``MultiWorkerMirroredStrategy``; the cluster and this
  process's place in it come from ``TF_CONFIG``, every worker runs the same command.
- ``--cpu-replicas N``: split the host CPU into N logical devices and mirror over them
  (tests, and rehearsing a multi-GPU run on a CPU host; no speed-up on few cores).

Devices can only be configured before TensorFlow starts its runtime, so
:func:`make_strategy` must run before any other TensorFlow work in the process.
"""

from __future__ import annotations

import json
import os

import tensorflow as tf

STRATEGIES = ("auto", "mirrored", "multiworker")


class StrategyError(ValueError):
    """A device or strategy request that cannot be met (one-line message)."""


def parse_gpus(text: str | None) -> list[int] | None:
    """``"-1"`` -> ``[]`` (CPU only), ``"0,1"`` -> ``[0, 1]``, None -> None (default)."""
    if text is None:
        return None
    text = text.strip()
    if text == "-1":
        return []
    try:
        ids = [int(part) for part in text.split(",")]
    except ValueError:
        ids = None
    if not ids or any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise StrategyError(f"-g/--gpu: expected GPU ids such as 0 or 0,1 (or -1 for the "
                            f"CPU), got {text!r}")
    return ids


def cluster_config() -> dict:
    """``TF_CONFIG`` parsed and checked: ``{"cluster": {...}, "task": {...}}``."""
    text = os.environ.get("TF_CONFIG", "")
    try:
        config = json.loads(text) if text else None
    except json.JSONDecodeError as error:
        raise StrategyError(f"TF_CONFIG is not valid JSON ({error})") from None
    if not config:
        raise StrategyError("--strategy multiworker needs TF_CONFIG, e.g. "
                            '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                            '"task": {"type": "worker", "index": 0}}')
    cluster, task = config.get("cluster") or {}, config.get("task") or {}
    members = cluster.get(task.get("type"))
    if not isinstance(members, list) or not 0 <= int(task.get("index", -1)) < len(members):
        raise StrategyError(f"TF_CONFIG: task {task} is not in the cluster {cluster}")
    return config


def make_strategy(gpu: str | None = None, kind: str = "auto",
                  cpu_replicas: int = 1) -> tf.distribute.Strategy:
    """The strategy for ``-g gpu --strategy kind --cpu-replicas n`` (see module doc).

    ``kind="auto"`` mirrors when several devices are asked for (``-g`` with GPU ids or
    ``cpu_replicas > 1``) and uses the default strategy otherwise.
    """
    gpus = parse_gpus(gpu)
    if kind not in STRATEGIES:
        raise StrategyError(f"--strategy: expected one of {', '.join(STRATEGIES)}, "
                            f"got {kind!r}")
    if cpu_replicas < 1:
        raise StrategyError(f"--cpu-replicas must be >= 1, got {cpu_replicas}")
    if cpu_replicas > 1 and (gpus or kind == "multiworker"):
        raise StrategyError("--cpu-replicas mirrors over CPU devices of one host; it "
                            "does not combine with -g <GPU ids> or --strategy multiworker")
    if kind == "multiworker":
        cluster_config()
    try:
        _configure_devices(gpu, gpus, cpu_replicas)
    except RuntimeError as error:                   # the runtime had already started
        raise StrategyError(f"devices must be configured before TensorFlow starts "
                            f"({error})") from None
    if kind == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if gpus:                          # the chosen GPUs are now visible as 0 .. k-1
        return tf.distribute.MirroredStrategy([f"/gpu:{i}" for i in range(len(gpus))])
    if cpu_replicas > 1:
        return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(cpu_replicas)])
    if kind == "mirrored":
        return tf.distribute.MirroredStrategy()         # every visible GPU, or the CPU
    return tf.distribute.get_strategy()


def _configure_devices(text, gpus, cpu_replicas) -> None:
    physical = tf.config.list_physical_devices("GPU")
    if gpus is not None:              # like the release's CUDA_VISIBLE_DEVICES=<-g>
        if gpus and not physical:
            raise StrategyError(f"-g {text}: TensorFlow sees no GPU on this machine; "
                                "use -g -1 to train on the CPU")
        absent = [i for i in gpus if i >= len(physical)]
        if absent:
            raise StrategyError(f"-g {text}: there is no GPU {absent[0]} (TensorFlow "
                                f"sees {len(physical)}: 0..{len(physical) - 1})")
        tf.config.set_visible_devices([physical[i] for i in gpus], "GPU")
    if cpu_replicas > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(cpu_replicas)])


def is_multi_worker(strategy) -> bool:
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def is_chief(strategy) -> bool:
    """True unless this process is a non-chief worker of a multi-worker run (the chief is
    the ``"chief"`` task, or worker 0 when the cluster has none)."""
    if not is_multi_worker(strategy):
        return True
    resolver = strategy.cluster_resolver
    if resolver.task_type in (None, "chief"):
        return True
    return (resolver.task_type == "worker" and resolver.task_id == 0
            and "chief" not in resolver.cluster_spec().as_dict())


def barrier(strategy) -> None:
    """Wait until every worker of a multi-worker run gets here (no-op otherwise)."""
    if is_multi_worker(strategy):
        tf.function(lambda: strategy.reduce(
            tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.constant(1.0)),
            axis=None))()
