"""The simulator's limiters: three shapes a provider (or a proxy in front of one) may enforce.

``token-bucket`` (the default): capacity = the per-minute limit, refilled continuously at limit/60
per second, never reset at a minute boundary, the way OpenAI and Anthropic describe their own
limiters. Any 60 s span can admit up to 2x the limit (a full bucket plus a minute of refill).

``rolling``: whatever was admitted in the last ``window_s`` seconds counts; each admission's room
returns exactly ``window_s`` after it was taken (a sliding log, as LLM proxies and API gateways
keep one).

``fixed``: a window of ``window_s`` opens at the first admission after the previous one closed
(aligned to first use, as TensorZero's windows are) and everything it admitted returns at once
when it closes.

A window holds ``limit x window_s / 60`` (a minute's worth for a 60 s window; a token bucket's
capacity likewise). An optional ``sub_window_s`` (e.g. 10 s) enforces a second, shorter window of
the same shape together with the first, holding ``limit x sub_window_s / 60``, the way a cloud
deployment that evaluates per-minute and per-10-second windows does. What a caller is told
(``BucketState``) is the per-minute limit, the room the next call can take (the smaller of the
windows' rooms) and when the binding window's room comes back (``reset_s``): a token bucket's
time to full (OpenAI's definition), a fixed window's end (everything returns then), a rolling
window's oldest counted admission's expiry (room starts coming back then, and keeps coming back
as later admissions expire; a moving window reports this, e.g. the ``limits`` library's).

Refunds (the unused part of an output reservation) go back to the window the admission was taken
from, if that still counts it. All methods are synchronous and the server runs one event loop, so
an admission (check every window, then take from all of them) is atomic without a lock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

BucketScope = tuple[str, str, str]  # (dialect, api key, model)
Shape = Literal["token-bucket", "rolling", "fixed"]
_EPSILON = 1e-6  # absorbs float error, so that a caller who waits exactly the advertised time fits


@dataclass(frozen=True)
class Rules:
    shape: Shape = "token-bucket"
    window_s: float = 60.0
    sub_window_s: float | None = None


class Window(Protocol):
    capacity: float

    def room(self, now: float) -> float: ...
    def wait_s(self, amount: float, now: float) -> float | None: ...
    def take(self, amount: float, now: float) -> Any: ...
    def give_back(self, handle: Any, amount: float, now: float) -> None: ...
    def reset_s(self, now: float) -> float: ...


class TokenBucket:
    def __init__(self, capacity: float, rate_per_s: float, now: float) -> None:
        self.capacity = capacity
        self.rate_per_s = rate_per_s
        self.level = capacity
        self.updated = now

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.updated)
        self.level = min(self.capacity, self.level + elapsed * self.rate_per_s)
        self.updated = now

    def room(self, now: float) -> float:
        self._refill(now)
        return min(self.level, self.capacity)

    def wait_s(self, amount: float, now: float) -> float | None:
        if amount > self.capacity:
            return None
        room = self.room(now)
        return 0.0 if room >= amount - _EPSILON else (amount - room) / self.rate_per_s

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level -= amount

    def give_back(self, handle: Any, amount: float, now: float) -> None:
        self._refill(now)
        self.level = min(self.capacity, self.level + amount)

    def reset_s(self, now: float) -> float:
        return max(0.0, self.capacity - self.room(now)) / self.rate_per_s


class RollingWindow:
    def __init__(self, capacity: float, window_s: float) -> None:
        self.capacity = capacity
        self.window_s = window_s
        self.entries: deque[list[float]] = deque()  # [admitted at, amount still counted]
        self.total = 0.0

    def _expire(self, now: float) -> None:
        while self.entries and self.entries[0][0] <= now - self.window_s:
            self.total -= self.entries.popleft()[1]

    def room(self, now: float) -> float:
        self._expire(now)
        return self.capacity - self.total

    def wait_s(self, amount: float, now: float) -> float | None:
        if amount > self.capacity:
            return None
        room = self.room(now)
        if room >= amount - _EPSILON:
            return 0.0
        for admitted, counted in self.entries:  # oldest first: the order they return in
            room += counted
            if room >= amount - _EPSILON:
                return admitted + self.window_s - now
        return self.window_s  # unreachable while the total is the entries' sum

    def take(self, amount: float, now: float) -> list[float]:
        self._expire(now)
        entry = [now, amount]
        self.entries.append(entry)
        self.total += amount
        return entry

    def give_back(self, handle: Any, amount: float, now: float) -> None:
        self._expire(now)
        if handle[0] > now - self.window_s:  # still counted
            returned = min(amount, handle[1])
            handle[1] -= returned
            self.total -= returned

    def reset_s(self, now: float) -> float:
        self._expire(now)
        oldest = next((admitted for admitted, counted in self.entries if counted > 0), None)
        return 0.0 if oldest is None else max(0.0, oldest + self.window_s - now)


class FixedWindow:
    def __init__(self, capacity: float, window_s: float) -> None:
        self.capacity = capacity
        self.window_s = window_s
        self.start: float | None = None  # opened by the first admission after the last one closed
        self.used = 0.0

    def _roll(self, now: float) -> None:
        if self.start is not None and now >= self.start + self.window_s:
            self.start, self.used = None, 0.0

    def room(self, now: float) -> float:
        self._roll(now)
        return self.capacity - self.used

    def wait_s(self, amount: float, now: float) -> float | None:
        if amount > self.capacity:
            return None
        if self.room(now) >= amount - _EPSILON or self.start is None:
            return 0.0
        return self.start + self.window_s - now

    def take(self, amount: float, now: float) -> float:
        self._roll(now)
        if self.start is None:
            self.start = now
        self.used += amount
        return self.start

    def give_back(self, handle: Any, amount: float, now: float) -> None:
        self._roll(now)
        if handle == self.start:  # the window it was taken from is still open
            self.used = max(0.0, self.used - amount)

    def reset_s(self, now: float) -> float:
        self._roll(now)
        if self.start is None or self.used <= 0:
            return 0.0
        return self.start + self.window_s - now


def build_windows(rules: Rules, limit: int, now: float) -> list[Window]:
    spans = [rules.window_s] + ([rules.sub_window_s] if rules.sub_window_s else [])
    windows: list[Window] = []
    for span in spans:
        capacity = limit * span / 60.0
        if rules.shape == "rolling":
            windows.append(RollingWindow(capacity, span))
        elif rules.shape == "fixed":
            windows.append(FixedWindow(capacity, span))
        else:
            windows.append(TokenBucket(capacity, limit / 60.0, now))
    return windows


@dataclass
class _Limit:
    limit: int
    rules: Rules
    windows: list[Window]


@dataclass(frozen=True)
class Denial:
    bucket: str
    limit: int
    used: int
    requested: int
    wait_s: float | None  # None: the request is larger than the bucket and can never fit


@dataclass
class Grant:
    """What an admission took, window by window, so that a refund goes back where it came from."""

    scope: BucketScope
    handles: dict[str, list[tuple[Window, Any]]] = field(default_factory=dict)


@dataclass(frozen=True)
class BucketState:
    bucket: str
    limit: int
    remaining: int
    reset_s: float  # when the room comes back: a token bucket's time to full, a window's return


class Limiter:
    """Every limit of every (dialect, api key, model), created full on first use."""

    def __init__(self) -> None:
        self._limits: dict[tuple[BucketScope, str], _Limit] = {}

    def clear(self) -> None:
        self._limits.clear()

    def admit(
        self,
        scope: BucketScope,
        charges: dict[str, int],
        limits: dict[str, int | None],
        now: float,
        rules: Rules = Rules(),
    ) -> Denial | Grant:
        """Take every charge if all of them fit now; otherwise take nothing and say why."""
        denials: list[Denial] = []
        for name, amount in charges.items():
            limit = self._limit(scope, name, limits.get(name), rules, now)
            if limit is None:
                continue
            waits = [window.wait_s(amount, now) for window in limit.windows]
            if any(wait != 0.0 for wait in waits):
                wait = None if None in waits else max(w for w in waits if w is not None)
                binding = min(limit.windows, key=lambda w: w.room(now))
                used = round(binding.capacity - binding.room(now))
                denials.append(Denial(name, limit.limit, used, amount, wait))
        if denials:
            # Report the bucket that can never fit, else the one the caller must wait longest for.
            return max(denials, key=lambda d: float("inf") if d.wait_s is None else d.wait_s)
        grant = Grant(scope)
        for name, amount in charges.items():
            limit = self._limit(scope, name, limits.get(name), rules, now)
            if limit is not None:
                grant.handles[name] = [(window, window.take(amount, now)) for window in limit.windows]
        return grant

    def refund(self, grant: Grant, name: str, amount: int, now: float) -> None:
        """Give ``amount`` of a granted charge back to the windows it was taken from (a window
        rebuilt since, by a changed shape, has nothing of it to give back)."""
        if amount <= 0:
            return
        for window, handle in grant.handles.get(name, []):
            window.give_back(handle, amount, now)

    def states(
        self,
        scope: BucketScope,
        limits: dict[str, int | None],
        now: float,
        rules: Rules = Rules(),
    ) -> list[BucketState]:
        states = []
        for name, configured in limits.items():
            limit = self._limit(scope, name, configured, rules, now)
            if limit is None:
                continue
            rooms = [window.room(now) for window in limit.windows]
            least = min(rooms)
            # The binding window: the least room; of those, the one whose room comes back last.
            reset = max(w.reset_s(now) for w, r in zip(limit.windows, rooms, strict=True) if r <= least)
            states.append(BucketState(name, limit.limit, max(0, int(least)), reset))
        return states

    def _limit(
        self, scope: BucketScope, name: str, limit: int | None, rules: Rules, now: float
    ) -> _Limit | None:
        if limit is None:
            return None
        current = self._limits.get((scope, name))
        if current is None or current.rules != rules:
            current = self._limits[(scope, name)] = _Limit(limit, rules, build_windows(rules, limit, now))
        elif current.limit != limit:
            # A changed limit applies to the state as it stands (a token bucket keeps its level,
            # capped at the new size; a window keeps what it counts).
            current.limit = limit
            for window, fresh in zip(current.windows, build_windows(rules, limit, now), strict=True):
                window.capacity = fresh.capacity
                if isinstance(window, TokenBucket):
                    window.rate_per_s = limit / 60.0
                    window.level = min(window.level, window.capacity)
        return current
