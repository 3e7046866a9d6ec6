"""A bounded memory of published pair ids, so a replayed event publishes nothing twice.

Pair ids are deterministic, so a candidate set or feedback replayed after a
crash (offsets not yet committed) or produced twice upstream gives ids seen
before. The trainer's ledger would skip them too; dropping them here keeps
them off the topic and shows replays in `odpo_judge_pairs_dropped_total{reason="duplicate"}`.
Bounded (least recently seen forgotten first), so memory stays flat in a long run.
"""

from __future__ import annotations

from collections import OrderedDict


class SeenIds:
    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, pair_id: str) -> bool:
        return pair_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, pair_id: str) -> bool:
        """Remember `pair_id`; False if it was already known (it is then refreshed)."""
        if pair_id in self._ids:
            self._ids.move_to_end(pair_id)
            return False
        self._ids[pair_id] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return True

    def forget(self, pair_id: str) -> None:
        """Undo `add` for a pair that was not published after all (its send failed)."""
        self._ids.pop(pair_id, None)
