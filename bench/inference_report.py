"""The report of ``bench/inference.py``: ratios, refinement, peers, throughput, the
machine, and the Markdown table."""

from __future__ import annotations

import os
import platform
import re

import keras
import tensorflow as tf

try:                                 # python -m bench.<script>; imported from the root (tests)
    from bench import machine
    from bench.inference_rows import PEER_STUDENTS, PEERS, RATIOS
except ModuleNotFoundError:          # python bench/<script>.py: sys.path[0] is bench/
    import machine
    from inference_rows import PEER_STUDENTS, PEERS, RATIOS


def machine_description() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            match = re.search(r"^model name\s*:\s*(.+)$", handle.read(), re.MULTILINE)
        model = match.group(1).strip() if match else model
    except OSError:
        pass
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1 (default)")
    return (f"{os.cpu_count()} CPUs ({model}), TensorFlow {tf.__version__}, Keras "
            f"{keras.__version__}, oneDNN opts {onednn}")


def measured(results: dict) -> dict:
    """The rows that ran (not ``{"skipped": why}``)."""
    return {name: r for name, r in results.items() if "median_ms" in r}


def ratio_pairs(names) -> list[tuple[str, str]]:
    """The ``(numerator, denominator)`` rows compared among ``names``: :data:`RATIOS`,
    each SavedModel row over its in-process row, each ``_bf16`` / ``_keras_upconv`` /
    ``+refine`` row over the row without it."""
    names = list(names)
    pairs = [(a, b) for a, b in RATIOS if a in names and b in names]
    for name in names:
        for prefix in ("savedmodel_", "savedmodel_portable_"):
            if name.startswith(prefix) and name[len(prefix):] in names:
                pairs.append((name, name[len(prefix):]))
        base = re.sub(r"(_bf16|_keras_upconv|\+refine[0-9]+)(?=$|@)", "", name, count=1)
        if base != name and base in names:
            pairs.append((name, base))
    return pairs


def ratios(results: dict, paired: dict | None = None) -> list[dict]:
    """Per pair of :func:`ratio_pairs`: ``{"label", "wall", "cpu"}`` (ratios of the rows'
    median wall / CPU times) and, where measured, :func:`paired_ratios`' fields."""
    results = measured(results)
    return [{"label": f"{a} / {b}",
             "wall": results[a]["median_ms"] / results[b]["median_ms"],
             "cpu": results[a]["cpu_ms"] / results[b]["cpu_ms"],
             **(paired or {}).get(f"{a} / {b}", {})}
            for a, b in ratio_pairs(results)]


def refinement(results: dict) -> dict[str, dict]:
    """``{row: {"steps", "ms_per_step"}}`` for each ``+refine`` row measured with its
    row without refinement: the added time over the step count (iterations vs time)."""
    table, results = {}, measured(results)
    for name, r in results.items():
        steps = r.get("refine_steps")
        base = re.sub(r"\+refine[0-9]+", "", name, count=1)
        if steps and base in results:
            table[name] = {"steps": steps, "ms_per_step":
                           (r["median_ms"] - results[base]["median_ms"]) / steps}
    return table


def measure_machine(size: str, repeats: int, bf16: bool, image_size: int | None = None) -> dict:
    """The machine's limits in this process (bench/machine.py): peak GFLOP/s per dtype
    (``bfloat16`` only when the bf16 rows run), memory bandwidth and (``image_size``) the
    gather floor of a warp at that size; ``{}`` for "off"."""
    if size == "off":
        return {}
    peaks = {"size": size, "float32": machine.peak_gflops("float32", size, repeats)}
    if bf16:
        peaks["bfloat16"] = machine.peak_gflops("bfloat16", size, repeats)
    peaks["memory"] = machine.memory_bandwidth(size, repeats)
    if image_size:
        peaks["gather"] = machine.gather_floor(image_size if size == "full" else 16, repeats)
    return peaks


def format_machine(peaks: dict) -> str:
    if not peaks:
        return "machine peak: not measured (--peak off): no fraction of peak"
    lines = [f"machine peak, this process ({peaks['size']} micro-benchmarks, median):"]
    for dtype in ("float32", "bfloat16"):
        if dtype in peaks:
            p = peaks[dtype]
            lines.append(f"  {dtype:9s} matmul {p['matmul']['n']}^2: "
                         f"{p['matmul']['gflops']:.1f} GFLOP/s; 1x1x1 conv "
                         f"{p['conv1x1x1']['grid']}^3 x {p['conv1x1x1']['channels']} ch: "
                         f"{p['conv1x1x1']['gflops']:.1f} GFLOP/s; peak {p['gflops']:.1f}")
    memory = peaks["memory"]
    lines.append(f"  memory    scale {memory['scale_gbs']:.1f} GB/s (read + write), sum "
                 f"{memory['sum_gbs']:.1f} GB/s (read), {memory['megabytes']:.0f} MB "
                 f"arrays, {memory['threads']} threads")
    if "gather" in peaks:
        gather = peaks["gather"]
        lines.append(f"  gathers   8 per voxel at {gather['size']}^3: {gather['floor_ms']:.1f} ms "
                     f"({gather['ns_per_value']:.2f} ns per value; plain "
                     f"{gather['plain_ms']:.1f}, XLA {gather['xla_ms']:.1f} ms)")
    return "\n".join(lines)


def peer_summary(results: dict) -> dict[str, dict[str, float | str]]:
    """``{student: {peer row: how many times faster (median wall), or why not}}``."""
    summary = {}
    for student in PEER_STUDENTS:
        if "median_ms" not in results.get(student, {}):
            continue
        summary[student] = {}
        for peer in PEERS:
            entry = results.get(peer)
            if entry is None:
                summary[student][peer] = "not in this run"
            elif "skipped" in entry:
                summary[student][peer] = f"skipped: {entry['skipped']}"
            else:
                summary[student][peer] = entry["median_ms"] / results[student]["median_ms"]
    return summary


def format_peers(results: dict) -> list[str]:
    lines = []
    for student, peers in peer_summary(results).items():
        parts = [f"{value:.1f}x faster than {PEERS[peer]}" if isinstance(value, float)
                 else f"{PEERS[peer]} {value}" for peer, value in peers.items()]
        lines.append(f"  {student}: " + ", ".join(parts))
    return ["", "peers (same run, median wall time):", *lines] if lines else []


def throughput(results: dict) -> dict[str, dict[int, float]]:
    """``{row without @b: {batch: pairs per second}}`` for rows measured at more than one
    batch size (``student_1`` counts as batch 1 of ``student_1@b4``)."""
    table = {}
    for name, r in measured(results).items():
        table.setdefault(name.split("@b")[0], {})[r.get("batch", 1)] = r["pairs_per_s"]
    return {name: dict(sorted(by_batch.items())) for name, by_batch in table.items()
            if len(by_batch) > 1}


def format_throughput(results: dict) -> list[str]:
    table = throughput(results)
    if not table:
        return []
    batches = sorted({b for by_batch in table.values() for b in by_batch})
    lines = ["", f"{'pairs per second (median)':36s}" + "".join(f"{f'batch {b}':>10s}"
                                                            for b in batches)]
    for name, by_batch in table.items():
        lines.append(f"  {name:34s}" + "".join(
            f"{by_batch[b]:10.2f}" if b in by_batch else f"{'-':>10s}" for b in batches))
    return lines


def format_table(results: dict, paired: dict | None = None) -> str:
    def mb(entry, key):
        return f"{entry[key]:,.0f}" if key in entry else "-"

    def speed(entry):
        if "work_gflop" in entry:
            work, rate = f"{entry['work_gflop']:.2f}", f"{entry['gflops']:.1f}"
        elif "bytes" in entry:
            work, rate = f"{entry['bytes'] / 1e6:.1f} MB", "-"
        else:
            work, rate = "-", "-"
        fraction = f"{100 * entry['peak_fraction']:.1f}" if "peak_fraction" in entry \
            else "-"
        if "bytes" in entry and "peak_fraction" in entry:
            fraction += " bw"
        limit = f"{entry['x_limit']:.1f}" if "x_limit" in entry else "-"
        if "x_floor" in entry:
            limit += f" ({entry['x_floor']:.1f} g)"
        return f"{work:>9s}{rate:>9s}{fraction:>9s}{limit:>13s}"
    lines = [f"{'row':36s}{'median ms':>10s}{'min':>8s}{'max':>8s}{'cpu ms':>9s}"
             f"{'params':>12s}{'rss MB':>8s}{'peak MB':>9s}{'+call':>7s}{'load':>6s}"
             f"{'GFLOP':>9s}{'GFLOP/s':>9s}{'% peak':>9s}{'x limit':>13s}"]
    for name, r in results.items():
        if "skipped" in r:
            lines.append(f"{name:36s}skipped: {r['skipped']}")
            continue
        lines.append(f"{name:36s}{r['median_ms']:10.1f}{r['min_ms']:8.1f}{r['max_ms']:8.1f}"
                     f"{r['cpu_ms']:9.1f}{r['params']:12,d}{mb(r, 'rss_mb'):>8s}"
                     f"{mb(r, 'peak_mb'):>9s}{mb(r, 'peak_increase_mb'):>7s}"
                     f"{r['load_1min']:6.1f}{speed(r)}")
    lines.append("GFLOP: convolutions and dense layers as the row runs them (2 per "
                 "multiply-add); % peak: GFLOP/s over the row dtype's measured peak; "
                 "warp: 'bw' = bandwidth bound (bytes / scale GB/s) over its time; "
                 "x limit: time over (GFLOP at the peak + warps' bytes at the bandwidth), "
                 "'g': the warp over eight gathers per voxel at the measured gather floor")
    lines.extend(format_throughput(results))
    lines.extend(format_peers(results))
    refined = refinement(results)
    if refined:
        lines.append("")
        lines.append("test-time refinement (added time per step, median rows):")
        lines.extend(f"  {name}: {r['steps']} steps, {r['ms_per_step']:.1f} ms per step"
                     for name, r in refined.items())
    table_ratios = ratios(results, paired)
    if table_ratios:
        lines.append("")
        lines.append(f"{'ratios of medians (paired: median ratio of alternating calls)':60s}"
                     f"{'wall':>7s}{'cpu':>7s}{'paired':>8s}")
        lines.extend(f"  {r['label']:58s}{r['wall']:7.2f}{r['cpu']:7.2f}"
                     + (f"{r['paired']:8.2f}" if "paired" in r else f"{'-':>8s}")
                     for r in table_ratios)
    checked = {name: r["slow_ops"] for name, r in results.items() if "slow_ops" in r}
    if checked:
        lines.append("")
        lines.append("graph check (slow ops in the traced / exported graph):")
        for name, found in checked.items():
            lines.append(f"  {name}: " + ("none" if not found else "; ".join(
                f"{op} ({reason})" for op, reason in found.items())))
    return "\n".join(lines)
