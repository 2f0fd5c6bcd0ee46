"""Which free slot an episode gets when its backend has slot classes by cache length: new episodes go to the
smallest class with a free slot, an episode that outgrows its slot to the smallest larger class that holds it.

Global slot ids run class by class in the backend's order (smallest cache first). Within a class the lowest free
slot goes first, so placement depends only on the order of requests, never on timing.

No deadlock: an episode in the largest class (whose cache holds the whole episode cap) never waits for a slot, so it
runs to its end and frees its slot; an episode waiting to move up waits only for such slots (or for slots of a
middle class, freed the same way by induction). Waits stay short because new episodes take a slot of a larger class
only while that class keeps `reserve` slots free for episodes that outgrow theirs, and movers are placed before new
episodes each tick.
"""

from __future__ import annotations

import heapq


def fits(capacity: int, length: int, reply_end: int) -> bool:
    """Can a slot of `capacity` cached tokens take a history of `length` tokens and make progress on a reply that
    stops at cache length `reply_end`? It must hold the history and either one more token (the sampled one, fed
    at the next decode step) or the whole reply when that ends right there."""
    return capacity >= min(reply_end, length + 1)


class SlotPool:
    def __init__(self, slot_classes, *, reserve: int = 1):
        """`slot_classes`: (slots, cache length) pairs, in global slot order with cache lengths increasing."""
        lengths = [length for _, length in slot_classes]
        if lengths != sorted(set(lengths)):
            raise ValueError(f"slot classes must have increasing cache lengths, got {tuple(slot_classes)}")
        self.classes = tuple((int(s), int(n)) for s, n in slot_classes)
        self.reserve = reserve
        self._free: list[list[int]] = []
        self._class_of: list[int] = []
        start = 0
        for k, (slots, _) in enumerate(self.classes):
            self._free.append(list(range(start, start + slots)))
            self._class_of += [k] * slots
            start += slots

    def capacity(self, slot: int) -> int:
        return self.classes[self._class_of[slot]][1]

    def take_new(self) -> int | None:
        """A slot for a new episode: the smallest class with a free slot, a larger class only above its reserve."""
        for k, free in enumerate(self._free):
            if len(free) > (0 if k == 0 else self.reserve):
                return heapq.heappop(free)
        return None

    def take_fitting(self, length: int, reply_end: int, *, larger_than: int = 0) -> int | None:
        """The lowest free slot of the smallest class above `larger_than` tokens that `fits` the history."""
        for k, (_, capacity) in enumerate(self.classes):
            if capacity > larger_than and fits(capacity, length, reply_end) and self._free[k]:
                return heapq.heappop(self._free[k])
        return None

    def release(self, slot: int) -> None:
        heapq.heappush(self._free[self._class_of[slot]], slot)
