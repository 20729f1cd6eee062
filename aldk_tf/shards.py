"""A deterministic 1/n of a list of pairs: ``--shard i/n`` of evaluation and extraction.

Shards are 1-based (``1/3``, ``2/3``, ``3/3``) and take every n-th pair of the unsharded
order starting at pair ``i - 1``, so they differ in size by at most one and a merge puts
every pair back in the unsharded order without looking at the data. A shard's files are
named ``<stem>.shard-<i>-of-<n><suffix>``.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass

SHARD_NAME = re.compile(r"^(?P<stem>.+)\.shard-(?P<index>\d+)-of-(?P<count>\d+)$")


class ShardError(ValueError):
    """A bad ``--shard`` value or an incomplete set of parts (one-line message)."""


@dataclass(frozen=True)
class Shard:
    index: int                        # 1-based
    count: int

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """``"2/3"`` -> ``Shard(2, 3)``; :class:`ShardError` unless ``1 <= i <= n``."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
        if not match:
            raise ShardError(f"--shard: expected i/n such as 1/3 (1-based), got {text!r}")
        index, count = int(match.group(1)), int(match.group(2))
        if count < 1 or not 1 <= index <= count:
            raise ShardError(f"--shard {text}: need 1 <= i <= n (shards are 1-based)")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def select(self, items: list) -> list:
        """This shard's items: ``items[i - 1 :: n]``."""
        return list(items)[self.index - 1::self.count]

    def positions(self, total: int) -> range:
        """Where this shard's items sit in the unsharded list of ``total`` items."""
        return range(self.index - 1, total, self.count)

    def name(self, stem: str, suffix: str = "") -> str:
        return f"{stem}.shard-{self.index}-of-{self.count}{suffix}"


def split_name(path: str, suffix: str = "") -> tuple[str, Shard] | None:
    """``(stem, shard)`` of a part's file name (``suffix`` removed), or None."""
    name = os.path.basename(path)
    if suffix and name.endswith(suffix):
        name = name[:-len(suffix)]
    match = SHARD_NAME.match(name)
    if not match:
        return None
    return match.group("stem"), Shard(int(match.group("index")), int(match.group("count")))


def find_parts(folder: str, stem: str, suffix: str) -> list[str]:
    """The part files ``<folder>/<stem>.shard-*-of-*<suffix>``, ordered by shard."""
    pattern = os.path.join(glob.escape(folder), f"{glob.escape(stem)}.shard-*-of-*{suffix}")
    parts = [path for path in glob.glob(pattern) if split_name(path, suffix)]
    return sorted(parts, key=lambda path: split_name(path, suffix)[1].index)


def check_complete(shards: list[Shard], what: str) -> int:
    """The shard count n, after checking ``shards`` are exactly 1/n .. n/n."""
    if not shards:
        raise ShardError(f"{what}: no shard parts to merge")
    counts = {shard.count for shard in shards}
    if len(counts) != 1:
        raise ShardError(f"{what}: parts of different splits ({sorted(counts)} shards)")
    count = counts.pop()
    indices = sorted(shard.index for shard in shards)
    if indices != list(range(1, count + 1)):
        missing = sorted(set(range(1, count + 1)) - set(indices))
        duplicated = sorted({i for i in indices if indices.count(i) > 1})
        detail = (f"missing {', '.join(f'{i}/{count}' for i in missing)}" if missing
                  else f"duplicated {', '.join(f'{i}/{count}' for i in duplicated)}")
        raise ShardError(f"{what}: incomplete set of shards ({detail})")
    return count
