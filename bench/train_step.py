"""Training speed at the machine's limit: ``python bench/train_step.py --size 64``.

One training step of each row, built by :func:`aldk_tf.training.run.build_trainer` (the
construction ``aldk-train`` runs), on a fixed batch of generated pairs
(:mod:`aldk_tf.data.synth`, the regime the shipped student is trained in: mixed
intensities, the soft-Dice label term). Rows:

- ``student``: the shipped student alone;
- ``teacher``: affine + VTN, one cascade (as the teacher trains);
- ``student_warp``: + image-level distillation (the teacher run on every batch, the moving
  image warped by its flow as a second similarity target);
- ``student_aldk``: + the WGAN-GP critic on flows (the paper's ALDK); ``student_aldk_images``:
  the critic on (fixed, warped) images;
- ``student_crd``: the cross-resolution student (1/2) with the CRD terms.

For each row, size and batch: milliseconds per step (median over ``--rounds`` rounds of 3
steps, the ALDK schedule's period), pairs per second, GFLOP per step and % of the machine's
convolution peak in the row's precision measured in the same run
(:func:`bench.machine.peak_gflops`), and
``× limit`` (the step against its GFLOP at that peak). GFLOP per step counts convolutions
and dense layers as :mod:`bench.work` does for inference, times 3 for a trained network
(forward, the gradient with respect to its inputs and to its weights) and once for a
frozen teacher's forward pass; the critic's work is not counted (its rows' % of peak is a
lower bound). Warps, losses and the optimizer are left out of the count: they are the
distance to the limit.

``--generator`` adds the pair generator's cost (ms per generated pair, its pipeline alone)
and the student's step fed by it (the input pipeline and the step sharing the cores).
``--profile ROW`` traces a few steps of one row with TensorFlow's profiler and writes where
the time goes (self time per op type, host threads summed) to the JSON.

Writes ``--json`` (every figure, the machine, the load average, the command).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import shlex
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from aldk_tf.config import (ALDKConfig, CRDConfig, LossWeights, ModelConfig,  # noqa: E402
                            RunConfig, TrainConfig, atomic_write_text)
from aldk_tf.data.synth import GeneratorSettings  # noqa: E402

ROWS = ("student", "teacher", "student_warp", "student_aldk", "student_aldk_images",
        "student_crd")
STEPS_PER_ROUND = 3                       # ALDKConfig's adversarial and critic period


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--precision", nargs="+", default=["float32"],
                        choices=("float32", "bfloat16"),
                        help="each row in each precision (bfloat16 rows: '_bf16')")
    parser.add_argument("--rounds", type=int, default=5,
                        help="timed rounds of 3 steps each, after 2 warm-up rounds")
    parser.add_argument("--generator", action="store_true",
                        help="also time the pair generator and the student fed by it")
    parser.add_argument("--profile", choices=ROWS, help="trace this row's steps")
    parser.add_argument("--profile-batch", type=int, default=2)
    parser.add_argument("--label", default="", help="a name for this run (e.g. before)")
    parser.add_argument("--before", help="the JSON of an earlier run (e.g. of the code "
                        "before a change): each row gets its before_ms and speed_up")
    parser.add_argument("--json", help="write the rows here (default: printed only, so a "
                        "trial run never overwrites a committed measurement)")
    return parser.parse_args(argv)


def row_config(row: str, size: int, batch: int, precision: str = "float32") -> RunConfig:
    """The run configuration a row trains with (the shipped student's regime)."""
    shape = (size,) * 3
    train = TrainConfig(batch=batch, round=1000, epochs=6, lr=1e-3, schedule="step",
                        clip_norm=1.0, generator=GeneratorSettings().to_dict(),
                        precision=precision)
    losses = LossWeights(label=1.0)
    student = ModelConfig(image_size=shape)
    configs = {
        "student": RunConfig(model=student),
        "teacher": RunConfig(model=ModelConfig(role="teacher", base="vtn", affine="vtn",
                                               image_size=shape)),
        "student_warp": RunConfig(model=student, aldk=ALDKConfig(flow_weight=1.0,
                                                                 flow_target="warped")),
        "student_aldk": RunConfig(model=student, aldk=ALDKConfig(enabled=True)),
        "student_aldk_images": RunConfig(model=student,
                                         aldk=ALDKConfig(enabled=True,
                                                         critic_input="images")),
        "student_crd": RunConfig(model=ModelConfig(image_size=shape, resolution_factor=2),
                                 crd=CRDConfig(enabled=True)),
    }
    return dataclasses.replace(configs[row], train=train, losses=losses)


def needs_teacher(config: RunConfig) -> bool:
    return config.aldk.enabled or config.aldk.flow_weight > 0 or config.crd.enabled


def generated_batch(config: RunConfig) -> dict:
    from aldk_tf.training.run import generated_dataset
    return next(iter(generated_dataset(config, 0)))


def build(config: RunConfig):
    """``(trainer parts, teacher)`` for one row; the teacher (untrained: its speed is
    that of a trained one) where the row learns from one."""
    from aldk_tf.training.run import build_trainer
    teacher = None
    if needs_teacher(config):
        teacher = ModelConfig(role="teacher", base="vtn", affine="vtn",
                              image_size=config.model.image_size).build(name="teacher")
        teacher.trainable = False
    return build_trainer(config, teacher, online=True), teacher


def ready(config: RunConfig, fed: bool = False):
    """``(trainer parts, teacher, train function, batches)`` of a row: the batches are one
    fixed generated batch repeated, or (``fed``) the pair generator itself."""
    from aldk_tf.training.run import generated_dataset
    parts, teacher = build(config)
    batches = (generated_dataset(config, 0) if fed else
               tf.data.Dataset.from_tensors(generated_batch(config)).repeat())
    # Keras 3 sets the function (ALDKTrainer's override returns it).
    train_function = parts.trainer.make_train_function() or parts.trainer.train_function
    return parts, teacher, train_function, iter(batches)


def step_gflop(parts, teacher, batch: int) -> dict:
    from bench.work import count_work
    trained = count_work(parts.network, batch, subpixel=True)["total"]
    frozen = (count_work(teacher, batch, subpixel=True)["total"] if teacher is not None
              else 0)
    return {"trained_network_gflop": trained / 1e9, "teacher_forward_gflop": frozen / 1e9,
            "gflop": (3 * trained + frozen) / 1e9}


def time_steps(train_function, iterator, rounds: int, warmup: int = 2) -> list[float]:
    """Seconds per step of ``rounds`` rounds of :data:`STEPS_PER_ROUND` steps each."""
    def one_round():
        started = time.perf_counter()
        for _ in range(STEPS_PER_ROUND):
            logs = train_function(iterator)
        # Keras returns an Optional of the logs; reading one value waits for the step.
        value = logs.get_value() if hasattr(logs, "get_value") else logs
        float(np.asarray(value["loss"]))
        return (time.perf_counter() - started) / STEPS_PER_ROUND

    for _ in range(warmup):
        one_round()
    return [one_round() for _ in range(rounds)]


def measure_row(row: str, size: int, batch: int, rounds: int, peak: float,
                fed: bool = False, precision: str = "float32") -> dict:
    import keras
    keras.utils.set_random_seed(0)
    config = row_config(row, size, batch, precision)
    parts, teacher, train_function, iterator = ready(config, fed)
    seconds = time_steps(train_function, iterator, rounds)
    work = step_gflop(parts, teacher, batch)
    ms = 1000.0 * float(np.median(seconds))
    name = row + ("_bf16" if precision == "bfloat16" else "") + ("+generator" if fed else "")
    result = {"row": name, "size": size, "batch": batch, "precision": precision,
              "ms_per_step": ms, "ms_per_step_rounds": [1000.0 * s for s in seconds],
              "pairs_per_second": batch / (ms / 1000.0), **work,
              "percent_of_peak": 100.0 * work["gflop"] / (ms / 1000.0) / peak,
              "limit_ms": 1000.0 * work["gflop"] / peak}
    result["x_limit"] = ms / result["limit_ms"]
    print(f"[train_step] {result['row']:>24} {size}^3 batch {batch}: {ms:8.1f} ms/step, "
          f"{result['pairs_per_second']:5.2f} pairs/s, {work['gflop']:6.1f} GFLOP, "
          f"{result['percent_of_peak']:4.0f} % of peak, {result['x_limit']:4.1f}x limit",
          file=sys.stderr)
    return result


def generator_cost(size: int, batch: int, batches: int = 8) -> dict:
    """Milliseconds per generated pair, the generator's pipeline alone."""
    config = row_config("student", size, batch)
    from aldk_tf.training.run import generated_dataset
    iterator = iter(generated_dataset(config, 0))
    for _ in range(2):
        next(iterator)
    started = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    seconds = (time.perf_counter() - started) / (batches * batch)
    return {"size": size, "batch": batch, "ms_per_pair": 1000.0 * seconds}


def profile_row(row: str, size: int, batch: int, steps: int = 6, top: int = 20) -> dict:
    """Self time per op type over ``steps`` traced steps (all host threads summed)."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2
    config = row_config(row, size, batch)
    _, _, train_function, iterator = ready(config)
    time_steps(train_function, iterator, rounds=0)
    with tempfile.TemporaryDirectory() as folder:
        tf.profiler.experimental.start(folder)
        time_steps(train_function, iterator, rounds=steps // STEPS_PER_ROUND, warmup=0)
        tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        paths = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)
        with open(paths[0], "rb") as handle:
            space.ParseFromString(handle.read())
    totals = op_self_times(space)
    total = sum(totals.values())
    ranked = sorted(totals.items(), key=lambda item: -item[1])[:top]
    return {"row": row, "size": size, "batch": batch, "steps": steps,
            "ms_per_step_by_op": {name: ms / steps for name, ms in ranked},
            "traced_ms_per_step": total / steps}


XLA_RUN = "CpuExecutable::ExecuteAsyncOnStream"


def op_kind(name: str) -> str | None:
    """The op type of a host event (``scope/op:Type``), ``"XLA cluster"`` for a compiled
    function's run, None for the framework's own events (executor, eager, threads)."""
    if name == XLA_RUN:
        return "XLA cluster (warp, smoothness, compiled parts)"
    if ":" not in name or "::" in name or ": " in name:     # e.g. "EagerExecute: f"
        return None
    return name.rsplit(":", 1)[-1]


def op_self_times(space) -> dict[str, float]:
    """Milliseconds of self time per op type (:func:`op_kind`) in the host plane (an op's
    self time: its duration minus that of ops nested in it on the same thread)."""
    totals: dict[str, float] = {}
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        kinds = {key: op_kind(meta.name) for key, meta in plane.event_metadata.items()}
        for line in plane.lines:
            events = sorted(((e.offset_ps, e.offset_ps + e.duration_ps, kinds[e.metadata_id])
                             for e in line.events if kinds.get(e.metadata_id)),
                            key=lambda e: (e[0], -e[1]))
            stack: list[list] = []                  # [end, kind, nested time, duration]
            for start, end, kind in events:
                while stack and stack[-1][0] <= start:
                    _close(stack.pop(), totals)
                if stack:
                    stack[-1][2] += end - start
                stack.append([end, kind, 0, end - start])
            while stack:
                _close(stack.pop(), totals)
    return totals


def _close(entry, totals) -> None:
    _, kind, nested, duration = entry
    totals[kind] = totals.get(kind, 0.0) + (duration - nested) / 1e9     # ps -> ms


def compare_with(document: dict, before: dict) -> dict:
    """Each row of ``document`` with ``before_ms`` (the same row, size and batch in
    ``before``; a ``_bf16`` row against its float32 row there) and ``speed_up``."""
    earlier = {(r["row"], r["size"], r["batch"]): r["ms_per_step"] for r in before["rows"]}
    for row in document["rows"]:
        key = (row["row"].replace("_bf16", ""), row["size"], row["batch"])
        if key in earlier:
            row["before_ms"] = earlier[key]
            row["speed_up"] = earlier[key] / row["ms_per_step"]
    document["before"] = {key: before.get(key) for key in ("command", "label", "peak",
                                                            "generator")}
    return document


def main(argv=None) -> int:
    args = parse_args(argv)
    from bench.machine import peak_gflops
    command = "python bench/train_step.py " + shlex.join(sys.argv[1:] if argv is None
                                                       else argv)
    peaks = {precision: peak_gflops(precision) for precision in args.precision}
    for precision, peak in peaks.items():
        print(f"[train_step] {precision} peak {peak['gflops']:.0f} GFLOP/s", file=sys.stderr)
    document = {"command": command, "label": args.label, "cpus": os.cpu_count(),
                "load_average_before": os.getloadavg(), "peak": peaks, "rows": []}

    before = None
    if args.before:
        with open(args.before) as handle:
            before = json.load(handle)

    def write():
        document["load_average_after"] = os.getloadavg()
        if before is not None:
            compare_with(document, before)
        if not args.json:
            return
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        atomic_write_text(args.json, json.dumps(document, indent=1) + "\n")

    for batch in args.batch:
        for row in args.rows:
            for precision in args.precision:
                document["rows"].append(measure_row(row, args.size, batch, args.rounds,
                                                    peaks[precision]["gflops"],
                                                    precision=precision))
                write()
        if args.generator:
            document.setdefault("generator", []).append(generator_cost(args.size, batch))
            document["rows"].append(measure_row("student", args.size, batch, args.rounds,
                                                peaks["float32"]["gflops"], fed=True))
            write()
    if args.profile:
        document["profile"] = profile_row(args.profile, args.size, args.profile_batch)
        for name, ms in document["profile"]["ms_per_step_by_op"].items():
            print(f"[train_step] profile {args.profile}: {ms:8.2f} ms/step  {name}",
                  file=sys.stderr)
    write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
