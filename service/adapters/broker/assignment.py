"""Which shards each consume process takes: a fair split every member computes alike.

Pure: the same member list gives every process the same answer, with no coordinator.
Each member gets `shards // n` or one more (the first members in sorted order take the
extra ones), so the split is fair within one shard. Within those quotas each shard goes
to the member ranked highest for it by a hash of (shard, member) — rendezvous hashing —
so a member joining or leaving moves few shards between the others.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence


def assign(members: Sequence[str], shards: Sequence[int]) -> dict[str, list[int]]:
    """Shards per member; every shard to exactly one member."""
    names = sorted(set(members))
    result: dict[str, list[int]] = {name: [] for name in names}
    if not names:
        return result
    base, extra = divmod(len(shards), len(names))
    room = {name: base + (1 if index < extra else 0) for index, name in enumerate(names)}
    for shard in shards:
        ranked = sorted(names, key=lambda name: _rank(shard, name), reverse=True)
        owner = next(name for name in ranked if room[name] > 0)
        room[owner] -= 1
        result[owner].append(shard)
    return result


def _rank(shard: int, member: str) -> int:
    return zlib.crc32(f"{shard}\x00{member}".encode())
