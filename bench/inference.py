"""Inference benchmark: full registration time per model and deployment path, one run.

    python bench/inference.py [--size 128] [--repeats 5] [--warmup 1]
                              [--rows ROW,ROW,...] [--json PATH] [--list]
                              [--peak full|quick|off] [--bf16 auto|on|off]
                              [--paired-rounds 7]

Every row is one way of registering a (fixed, moving) pair of ``[1, S, S, S, 1]``
float32 volumes: networks + warps + flow composition as deployed; preprocessing (file
reading, resampling) excluded. A row is built (``keras.utils.set_random_seed(0)``,
randomly initialised weights: the time does not depend on the weights' values), called
``--warmup`` times (tracing, XLA compilation, TFLite allocation), then timed ``--repeats``
times with ``time.perf_counter`` around the call and the fetch of both outputs.

Row names: ``[savedmodel_ | savedmodel_portable_ | tflite_<fp32|fp16|int8>_]<model>
[_bf16 | _keras_upconv][+refine<N>][@b<N>]``
with ``<model>`` one of ``teacher_affine_vtn1``, ``teacher_affine_vtn3``,
``student_1``, ``student_2``, ``student_3``, ``student_crd_1`` (cross-resolution,
1/2), ``voxelmorph_1`` (the peer network: ``train.py -b VoxelMorph -n 1``, i.e. the VTN
affine stem and one VoxelMorph cascade), plus the rows ``warp`` (one trilinear warp of
the image alone) and ``ants_syn`` (the peer method: ANTs SyN, affine + deformable, through
``antspyx`` -- the optional extra ``pip install 'aldk-tf[bench]'`` -- on the same pair,
``--ants-repeats`` timed calls without warm-up; "skipped: antspyx not installed" when it
is absent). Under the table: "N x faster than VoxelMorph, M x faster than ANTs SyN" for
``student_crd_1`` and ``student_1`` (``"peers"`` in the JSON).

- ``<model>``: in-process, :func:`aldk_tf.deploy.inference.registration_function` (fixed
  input signature; flow heads as sub-pixel convolutions, float32).
- ``_bf16``: the same with the convolutions in bfloat16 (``dtype="bfloat16"``). Built
  only where the CPU has native bfloat16 (``amx_bf16`` or ``avx512_bf16`` in
  ``/proc/cpuinfo``) or with ``--bf16 on`` (default ``$ALDK_BF16`` or ``auto``); otherwise
  the row says ``skipped:`` and why.
- ``@b<N>`` (throughput rows, not TFLite): the same graph traced for batch ``N`` (the
  pair repeated ``N`` times); ``pairs_per_s`` = N / median seconds, listed per batch
  under the table (what a serving team sizes hardware with).
- ``+refine<N>`` (in-process only): the row's registration, then ``N`` steps of test-time
  refinement of its flow (:func:`aldk_tf.training.refine.refine_flow`, default step size)
  and the warp by the refined flow -- what ``register --refine N`` runs. Under the table:
  the added time per step (iterations vs time; the study's Dice per step count is in
  README.md). The refinement's arithmetic is not counted in the row's GFLOP.
- ``_keras_upconv``: the Keras graph unchanged (``subpixel=False``), i.e. what the
  TFLite files are converted from (``export.py``'s SavedModel has the sub-pixel heads).
- ``savedmodel_``: the row's graph saved with :func:`aldk_tf.deploy.serving.save_savedmodel`
  to a temporary directory, reloaded with ``tf.saved_model.load``, called through its
  ``serving_default`` signature.
- ``savedmodel_portable_``: the same module saved with ``portable=True`` (``export.py
  --portable``, for TF Serving without XLA): the ``_XlaMustCompile`` marks stripped,
  which shows what the warps cost without XLA.
- ``tflite_<variant>_``: :func:`aldk_tf.deploy.serving.convert_tflite` of the model as
  ``export.py`` converts it, run by ``tf.lite.Interpreter(num_threads=2)``.

Per row: median / min / max wall milliseconds, median process CPU milliseconds (all
threads; steadier than wall time on a shared machine), parameters
(``parameter_report()["total"]``), and memory: ``rss`` is the process's resident memory
before the row's first call (model built, everything earlier in the process included),
``peak`` the process's peak resident memory during the row's calls (``VmHWM``, reset
through ``/proc/self/clear_refs`` before the first call), ``+call`` their difference
(what inference itself needed on top). These are process-level numbers; memory that
TensorFlow or the allocator kept from earlier rows counts in ``rss``.

Distance to the machine's limit, measured in the same process: before the rows,
``--peak full`` times a 2048^2 ``tf.matmul`` and a 1x1x1 ``Conv3D`` (64^3 x 128 channels)
in float32 and bfloat16 (median of ``--repeats``, TensorFlow's default threads) and the
memory bandwidth (STREAM-style scale and sum over 256 MB arrays, one thread per core;
:mod:`bench.machine`). Per network row: ``work_gflop``, the convolutions' and dense
layers' FLOP as the row runs them (2 per multiply-add, sub-pixel flow heads in their
convolution form; :mod:`bench.work`), ``gflops`` = work / median time and
``peak_fraction`` = ``gflops`` / the larger of the two micro-benchmarks of the row's
dtype. The ``warp`` row: ``bytes`` it must move (20 per voxel: image and flow read,
result written), ``bound_ms`` = bytes / scale bandwidth, ``peak_fraction`` = ``bound_ms``
/ median. ``--peak quick`` only checks that the micro-benchmarks run (tiny sizes, not a
peak); ``--json`` writes ``{"machine": {...}, "rows": {row: {...}}, "peers": {...}, "ratios":
{"a / b": {"wall", "cpu", "paired", "paired_cpu", "rounds"}}, "refinement": {row:
{"steps", "ms_per_step"}}}``.

The table ends with ratios: of the rows' medians, and ``paired`` -- after all rows, the two
rows of each ratio called in alternation (a b, b a, ...) for ``--paired-rounds`` rounds,
the median of the per-round ratios (rows measured minutes apart see a shared machine at
different speeds; back-to-back calls see the same one). Ratios: :data:`RATIOS` (teacher /
student, the cross-resolution student over the full-resolution one and over the warp, the
full-resolution student over the warp, peers), every SavedModel row over its in-process
row, every ``_bf16`` / ``_keras_upconv`` / ``+refine`` row over the row without it
(``ants_syn`` and ``+refine`` rows are not paired: seconds per call; the paired rows keep
their models loaded until then, so the process grows by a few GB over a full run;
``--paired-rounds 0`` turns pairing off). Then the graph check: for in-process and
SavedModel rows, any op of :data:`aldk_tf.deploy.inference.SLOW_OPS` in the graph, or
gathers outside XLA.

The code is split by concern: ``inference_rows.py`` (row names, models, each row built
and ready to time), ``inference_measure.py`` (time, memory, work against the machine's
peak, paired ratios), ``inference_report.py`` (ratios, refinement, peers, throughput, the
table); this file is the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from aldk_tf.config import atomic_write_text  # noqa: E402
from aldk_tf.deploy import serving  # noqa: E402

try:                                 # python -m bench.<script>; imported from the root (tests)
    from bench import machine
    from bench.inference_measure import paired_ratios, run_row
    from bench.inference_report import (format_machine, format_table,
                                        machine_description, measure_machine,
                                        peer_summary, ratio_pairs, ratios, refinement)
    from bench.inference_rows import (DEFAULT_ROWS, UNPAIRED, Skipped, parse_row,
                                      sample_pair, smooth_flow)
except ModuleNotFoundError:          # python bench/<script>.py: sys.path[0] is bench/
    import machine
    from inference_measure import paired_ratios, run_row
    from inference_report import (format_machine, format_table, machine_description,
                                  measure_machine, peer_summary, ratio_pairs, ratios,
                                  refinement)
    from inference_rows import (DEFAULT_ROWS, UNPAIRED, Skipped, parse_row, sample_pair,
                                smooth_flow)

#: What tests and other scripts use from here (defined in the modules above).
__all__ = ["DEFAULT_ROWS", "format_table", "main", "paired_ratios", "parse_row",
           "ratio_pairs", "ratios", "refinement", "smooth_flow"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128, help="volume size S (S^3), "
                        "divisible by 32 for the cross-resolution rows (default 128)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per row")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (>= 1)")
    parser.add_argument("--rows", help="comma-separated rows (default: all of --list)")
    parser.add_argument("--json", help="write {row: {median_ms, params, ...}} here")
    parser.add_argument("--list", action="store_true", help="print the default rows")
    parser.add_argument("--bf16", default=machine.default_bf16_mode(),
                        help="the _bf16 rows and the bf16 peak: 'auto' (default, or "
                             f"${machine.BF16_ENV}) runs them only where /proc/cpuinfo "
                             "lists amx_bf16 or avx512_bf16; 'on' forces them; 'off' skips "
                             "them")
    parser.add_argument("--ants-repeats", "--ants_repeats", type=int, default=1,
                        help="timed calls of the ants_syn row (no warm-up; default 1)")
    parser.add_argument("--paired-rounds", "--paired_rounds", type=int, default=7,
                        help="after the rows, each ratio again from this many rounds of "
                             "alternating calls of its two rows (0: off; default 7)")
    parser.add_argument("--peak", choices=("full", "quick", "off"), default="full",
                        help="machine micro-benchmarks before the rows (peak GFLOP/s, "
                             "memory bandwidth): 'quick' only checks they run (default "
                             "full)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        print("\n".join(DEFAULT_ROWS))
        return 0
    names = [n.strip() for n in args.rows.split(",") if n.strip()] if args.rows \
        else list(DEFAULT_ROWS)
    try:
        rows = [parse_row(name) for name in dict.fromkeys(names)]
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.repeats < 1 or args.warmup < 1 or args.ants_repeats < 1:
        print("error: --repeats, --warmup and --ants-repeats must be >= 1", file=sys.stderr)
        return 2
    if args.paired_rounds < 0:
        print(f"error: --paired-rounds: expected an integer >= 0, got {args.paired_rounds}",
              file=sys.stderr)
        return 2
    try:
        bf16, bf16_reason = machine.bf16_decision(args.bf16)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        try:                  # checked now, not after minutes of measuring
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(args.json))):
                pass
        except OSError as error:
            print(f"error: --json {args.json}: cannot write there "
                  f"({error.strerror or error})", file=sys.stderr)
            return 2
    print(f"full registration of one {args.size}^3 pair (batch 1), randomly initialised "
          f"weights; median of {args.repeats} after {args.warmup} warm-up call(s)")
    print(f"machine: {machine_description()}; load average at start "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    print(f"bfloat16 rows: {'run' if bf16 else 'skipped'} ({bf16_reason})")
    peaks = measure_machine(args.peak, args.repeats, bf16=bf16, image_size=args.size)
    print(format_machine(peaks), flush=True)
    fixed, moving = sample_pair(args.size)
    results, calls, paired = {}, {}, {}
    paired_rows = {name for pair in ratio_pairs(row.name for row in rows)
                   if not any(name in UNPAIRED or "+refine" in name for name in pair)
                   for name in pair} if args.paired_rounds else set()
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as workdir:
        for row in rows:
            if row.dtype == "bfloat16" and not bf16:
                results[row.name] = {"skipped": f"no bfloat16: {bf16_reason}"}
                continue
            started = time.perf_counter()
            try:
                results[row.name], call = run_row(
                    row, args.size, fixed, moving, args.warmup, args.repeats, workdir,
                    peaks, args.ants_repeats, keep=row.name in paired_rows)
            except Skipped as reason:
                results[row.name] = {"skipped": str(reason)}
                print(f"  {row.name}: skipped: {reason}", file=sys.stderr, flush=True)
                continue
            except (ValueError, serving.ExportError) as error:
                print(f"{row.name}: failed: {error}", file=sys.stderr, flush=True)
                continue
            if call is not None:
                calls[row.name] = call
            r = results[row.name]
            print(f"  {row.name}: {r['median_ms']:.1f} ms (row took "
                  f"{time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        if calls:
            started = time.perf_counter()
            paired = paired_ratios(ratio_pairs(calls), calls, args.paired_rounds)
            print(f"  paired ratios: {len(paired)} pairs x {args.paired_rounds} rounds "
                  f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        calls.clear()
    print()
    print(format_table(results, paired))
    print(f"\nload average at end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.json:
        peaks = {**peaks, "bf16": {"run": bf16, "reason": bf16_reason,
                                   "cpu_flags": machine.bf16_features()}}
        atomic_write_text(args.json, json.dumps(
            {"machine": peaks, "rows": results, "peers": peer_summary(results),
             "ratios": {r.pop("label"): r for r in ratios(results, paired)},
             "refinement": refinement(results)}, indent=2) + "\n")
    return 0 if len(results) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
