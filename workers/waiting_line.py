"""The threads of one worker process that wait for room on the same deployment take turns to ask.

Without it, every thread told "wait 0.15 s" sleeps and asks the shared bucket again: under a
rate limit 32 threads asked about 40 times per call admitted, and those takes were a third of the
pool's CPU. In the line only its head sleeps and asks; the others wait on a condition (no CPU,
no Redis) until the head is granted room or leaves, and then the next asks at once (a refund or
a refill may have room for several). The line is ordered by priority, then by arrival, so an
interactive request that joins is the next to ask.

The line also knows how long a place in it lasts: the time between the grants this process has
seen on the deployment. A thread whose turn is too far away to wait in place leaves with that
expectation (its place times that spacing), so that the request parks for about as long as its
turn takes rather than the head's next step, and does not come back to find the same line.

Only one process: the other processes' heads ask the same bucket, which stays the only judge.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from db.states import Priority

# Lower asks first.
RANK: dict[str, int] = {Priority.INTERACTIVE: 0, Priority.DEFAULT: 1, Priority.BULK: 2}
# Weight of the newest interval between grants in the spacing (an exponential mean).
SPACING_WEIGHT = 0.2
# An interval longer than this is a pause in the traffic (a window's room spent, waiting for its
# next moment), not the spacing of a line.
SPACING_MAX_S = 2.0


@dataclass(order=True, frozen=True)
class Place:
    rank: int
    seq: int
    deployment: str = field(compare=False)
    ahead: int = field(default=0, compare=False)  # places ahead of it when it joined
    grants_before: int = field(default=0, compare=False)  # the line's grants until it joined


@dataclass
class _Line:
    places: list[Place] = field(default_factory=list)  # a heap: places[0] is the head
    grants: int = 0  # granted to places in the line
    last_grant: float | None = None
    spacing_s: float | None = None


class WaitingLine:
    """One per worker process, shared by its threads."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._changed = threading.Condition()
        self._lines: dict[str, _Line] = {}
        self._seq = itertools.count()

    def join(self, deployment: str, priority: str) -> Place:
        with self._changed:
            line = self._lines.setdefault(deployment, _Line())
            rank = RANK.get(priority, 1)
            ahead = sum(other.rank <= rank for other in line.places)
            place = Place(rank, next(self._seq), deployment, ahead, line.grants)
            heapq.heappush(line.places, place)
        return place

    def is_head(self, place: Place) -> bool:
        with self._changed:
            return self._line(place).places[0] == place

    def wait_turn(self, place: Place, timeout_s: float) -> bool:
        """Block until ``place`` heads its line (True) or ``timeout_s`` has passed (False)."""
        deadline = self._clock() + timeout_s
        with self._changed:
            places = self._line(place).places
            while places[0] != place:
                left = deadline - self._clock()
                if left <= 0:
                    return False
                self._changed.wait(left)
            return True

    def granted(self, deployment: str, place: Place | None) -> None:
        """Room was granted, to a thread in the line (it leaves it) or to one that never joined."""
        with self._changed:
            line = self._lines.get(deployment)
            if line is None:
                return
            self._count_grant(line)
            # A grant to a thread that never joined leaves those in the line where they were.
            if place is not None:
                line.grants += 1
                self._remove(line, place)

    def leave(self, place: Place) -> None:
        """Out of the line without room (it waits elsewhere, or the chain goes on)."""
        with self._changed:
            self._remove(self._line(place), place)

    def expected_wait_s(self, place: Place, head_wait_s: float) -> float:
        """How long until ``place`` is granted: the head's own wait, then the spacing for every
        place that was ahead of it when it joined and has not been granted room since (those that
        left to wait elsewhere count: they come back first). No spacing seen, no more than the
        head's wait: a window's room comes back all at once, and whoever waits for its moment must
        be there when it comes."""
        with self._changed:
            line = self._line(place)
            ahead = max(0, place.ahead - (line.grants - place.grants_before))
            step = line.spacing_s or 0.0
        return head_wait_s + ahead * step

    def _line(self, place: Place) -> _Line:
        return self._lines[place.deployment]

    def _remove(self, line: _Line, place: Place) -> None:
        """The next place asks at once: a refund or a refill may have room for several."""
        line.places.remove(place)
        heapq.heapify(line.places)
        if not line.places and line.spacing_s is None:
            del self._lines[place.deployment]
        self._changed.notify_all()

    def _count_grant(self, line: _Line) -> None:
        now = self._clock()
        if line.last_grant is not None and line.places:
            interval = now - line.last_grant
            if interval <= SPACING_MAX_S:
                old = line.spacing_s
                line.spacing_s = interval if old is None else old + SPACING_WEIGHT * (interval - old)
        line.last_grant = now
