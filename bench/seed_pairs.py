"""Distillation against the student alone, paired by seed: ``python bench/seed_pairs.py``.

A row trained with seed ``k`` is named ``<row>_s<k>`` (``bench/long_train.py --seed k
--name <row>_s<k>``); the same seed gives two rows the same stream of generated pairs and
the same initialisation, so their difference is the term's effect plus what one seed
moves. This script reads the test Dice of every row from a ``bench/heldout_eval.py`` JSON
and the validation Dice at the last step from each run's ``long-<name>.json`` record, and
writes, for every ``ROW:BASELINE`` asked for, the per-seed Dice of both and their
difference, then the mean difference over seeds with its sample standard deviation and
standard error. A term is "ahead by more than the seeds move" only when the mean minus two
standard errors stays above zero.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(HERE))

from aldk_tf.config import atomic_write_text  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--test", required=True, help="bench/heldout_eval.py --json output")
    parser.add_argument("--records", required=True,
                        help="folder of the runs' long-<name>.json records (--results)")
    parser.add_argument("--compare", nargs="+", required=True, metavar="ROW:BASELINE")
    parser.add_argument("--seeds", nargs="+", type=int, required=True)
    parser.add_argument("--json", help="write the summary here")
    parser.add_argument("--markdown", help="write the table here")
    return parser.parse_args(argv)


def final_validation(records: str, name: str) -> float | None:
    """The validation Dice at the run's last validated step (not the best: the
    comparison is at the same budget), or None when the run has no record."""
    path = os.path.join(records, f"long-{name}.json")
    if not os.path.isfile(path):
        return None
    history = json.load(open(path)).get("history") or []     # [[step, dice], ...]
    return float(history[-1][1]) if history else None


def paired(test_rows: dict, records: str, row: str, baseline: str, seeds) -> dict:
    """Per-seed Dice of ``row`` and ``baseline`` (test and validation) and the summary
    of their test differences. Raises ``KeyError`` naming a missing row."""
    per_seed = []
    for seed in seeds:
        names = (f"{row}_s{seed}", f"{baseline}_s{seed}")
        for name in names:
            if name not in test_rows:
                raise KeyError(f"no test row {name!r} in the heldout_eval JSON")
        test = [float(test_rows[name]["dice"]) for name in names]
        validation = [final_validation(records, name) for name in names]
        per_seed.append({"seed": seed, "test": test, "validation": validation,
                         "difference": test[0] - test[1]})
    return {"row": row, "baseline": baseline, "seeds": per_seed,
            **summary([entry["difference"] for entry in per_seed])}


def summary(differences) -> dict:
    """Mean, sample standard deviation and standard error of ``differences`` (the last
    two None for a single seed), and whether mean - 2 SE > 0."""
    mean = statistics.fmean(differences)
    if len(differences) < 2:
        return {"mean": mean, "sd": None, "se": None, "ahead": None}
    sd = statistics.stdev(differences)
    se = sd / len(differences) ** 0.5
    return {"mean": mean, "sd": sd, "se": se, "ahead": mean - 2 * se > 0}


def points(value) -> str:
    return "" if value is None else f"{100 * value:+.1f}"


def dice(value) -> str:
    return "" if value is None else f"{value:.3f}"


def markdown(command: str, comparisons: list[dict]) -> str:
    lines = [f"`{command}`", "",
             "| row | baseline | seed | validation row / baseline | test row / baseline "
             "| test difference (points) |",
             "|---|---|---:|---|---|---:|"]
    for comparison in comparisons:
        for entry in comparison["seeds"]:
            validation = " / ".join(dice(v) for v in entry["validation"])
            test = " / ".join(dice(v) for v in entry["test"])
            lines.append(f"| `{comparison['row']}` | `{comparison['baseline']}` | "
                         f"{entry['seed']} | {validation} | {test} | "
                         f"{points(entry['difference'])} |")
        spread = ("" if comparison["sd"] is None else
                  f" (sd {100 * comparison['sd']:.1f}, SE {100 * comparison['se']:.1f})")
        lines.append(f"| `{comparison['row']}` | `{comparison['baseline']}` | mean | | | "
                     f"**{points(comparison['mean'])}**{spread} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        test_rows = json.load(open(args.test))["rows"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        print(f"error: --test {args.test}: expected a bench/heldout_eval.py JSON ({error})",
              file=sys.stderr)
        return 2
    comparisons = []
    for spec in args.compare:
        row, sep, baseline = spec.partition(":")
        if not sep or not row or not baseline:
            print(f"error: --compare {spec!r}: expected ROW:BASELINE", file=sys.stderr)
            return 2
        try:
            comparisons.append(paired(test_rows, args.records, row, baseline,
                                      args.seeds))
        except KeyError as error:
            print(f"error: --test {args.test}: {error.args[0]}", file=sys.stderr)
            return 2
    command = "python bench/seed_pairs.py " + " ".join(argv if argv is not None
                                                       else sys.argv[1:])
    table = markdown(command, comparisons)
    print(table)
    if args.json:
        atomic_write_text(args.json, json.dumps({"command": command,
                                                 "comparisons": comparisons},
                                                indent=1) + "\n")
    if args.markdown:
        atomic_write_text(args.markdown, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
