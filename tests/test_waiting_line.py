"""The threads of one worker process waiting for room on a deployment take turns to ask its bucket:
only the head asks, the order is priority then arrival, and a thread whose turn is too far away
leaves with the wait its place implies."""

from __future__ import annotations

import threading
import time

import pytest
import redis as redis_lib

from broker_config.deployments import Deployment
from workers.admission import Bucket, BucketPolicy, Estimate, Ticket, Wait, admit
from workers.policy import busy_park_s
from workers.waiting_line import WaitingLine


def takes(client: redis_lib.Redis) -> int:
    """Scripts the Redis has run: every take and settlement is one."""
    stats = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval"))


def test_the_line_is_ordered_by_priority_then_arrival() -> None:
    line = WaitingLine()
    first = line.join("d", "default")
    second = line.join("d", "default")
    other = line.join("e", "bulk")  # another deployment's line
    assert line.is_head(first) and line.is_head(other)
    urgent = line.join("d", "interactive")
    assert line.is_head(urgent) and not line.is_head(first)
    assert not line.wait_turn(second, 0.05)  # not its turn within the time given
    line.granted("d", urgent)
    assert line.is_head(first)
    line.leave(first)
    assert line.wait_turn(second, 0.0)
    line.leave(second)
    line.leave(other)


def test_a_place_expects_the_spacing_of_the_grants_this_process_has_seen() -> None:
    now = [100.0]
    line = WaitingLine(clock=lambda: now[0])
    places = [line.join("d", "default") for _ in range(4)]
    # No grant seen yet: nothing known of the line's pace, only the head's own wait.
    assert line.expected_wait_s(places[3], 0.5) == 0.5
    for place in places[:2]:
        now[0] += 0.2
        line.granted("d", place)
    # One interval seen (0.2 s); the first grant had nothing before it.
    assert line.expected_wait_s(places[3], 0.1) == pytest.approx(0.1 + 1 * 0.2)
    now[0] += 30.0  # a pause in the traffic (a window's next moment) is not the line's spacing
    line.granted("d", places[2])
    assert line.expected_wait_s(places[3], 0.1) == pytest.approx(0.1)


def test_only_the_head_of_the_line_asks_the_bucket(redis: redis_lib.Redis) -> None:
    """16 threads of one process wait for a drained 600 RPM deployment (a call every 0.1 s): each
    asks once when it comes, and after that only the head asks; every one is admitted, in the
    order of the line. Without the line each thread asked again after every 0.1 s wait."""
    deployment = Deployment(name="d", provider="openai", model="m", rpm=600)
    bucket = Bucket(redis, BucketPolicy(first_call_s=0.0, floors={}))
    line = WaitingLine()

    def one(request_id: str, priority: str = "default") -> Ticket | Wait | object:
        return admit(
            bucket,
            deployment,
            Estimate(10, 10),
            request_id=request_id,
            priority=priority,
            tenant=None,
            max_inline_wait_s=5.0,
            sleep=time.sleep,
            line=line,
        )

    for i in range(600):  # drain it
        assert isinstance(one(f"drain-{i}"), Ticket)
    before = takes(redis)
    granted: list[str] = []
    lock = threading.Lock()

    def waiter(request_id: str, priority: str) -> None:
        assert isinstance(one(request_id, priority), Ticket)
        with lock:
            granted.append(request_id)

    threads = [threading.Thread(target=waiter, args=(f"r{i}", "default")) for i in range(15)]
    for thread in threads:
        thread.start()
        time.sleep(0.005)
    late = threading.Thread(target=waiter, args=("urgent", "interactive"))
    late.start()
    for thread in [*threads, late]:
        thread.join(30)
    asked = takes(redis) - before
    assert sorted(granted) == sorted([f"r{i}" for i in range(15)] + ["urgent"])
    # One take each on arrival, about one per grant by the head, and some slack for the jitter.
    assert asked <= 16 + 2 * 16, asked
    # The interactive request came last but was admitted ahead of most of those waiting.
    assert granted.index("urgent") < 8


def test_a_thread_whose_turn_is_too_far_away_parks_for_about_as_long_as_its_place(
    redis: redis_lib.Redis,
) -> None:
    """A drained 600 RPM deployment (a call every 0.1 s), 20 threads, in-place waits of at most
    2 x 0.3 s: a few are admitted in place, the others leave the line when their time is up, each
    with the wait its place implies (the places ahead times the spacing of the grants), not the
    head's next 0.1 s: a request parked for that would come back to the same line at once."""
    deployment = Deployment(name="d", provider="openai", model="m", rpm=600)
    bucket = Bucket(redis, BucketPolicy(first_call_s=0.0, floors={}))
    line = WaitingLine()
    results: dict[str, object] = {}

    def one(request_id: str, max_inline_wait_s: float) -> object:
        return admit(
            bucket,
            deployment,
            Estimate(10, 10),
            request_id=request_id,
            priority="default",
            tenant=None,
            max_inline_wait_s=max_inline_wait_s,
            sleep=time.sleep,
            line=line,
        )

    for i in range(600):
        assert isinstance(one(f"drain-{i}", 0.0), Ticket)

    def waiter(request_id: str) -> None:
        results[request_id] = one(request_id, 0.3)

    threads = [threading.Thread(target=waiter, args=(f"r{i}",)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    tickets = [r for r in results.values() if isinstance(r, Ticket)]
    waits = sorted(r.expected_s or 0.0 for r in results.values() if isinstance(r, Wait))
    assert all(r.seconds <= 0.11 for r in results.values() if isinstance(r, Wait))  # the bucket's own
    assert len(tickets) >= 2 and len(waits) == 20 - len(tickets) >= 8
    # The last in line had at least 8 places ahead of it when its time was up.
    assert waits[-1] >= 0.1 + 7 * 0.08, waits
    assert waits[0] < waits[-1] / 2, waits


def test_a_request_parks_for_its_places_wait_but_never_past_its_deadline() -> None:
    # No line (or nothing expected): the bucket's own soonest.
    assert busy_park_s(0.2, None, 3600.0) == 0.2
    # A place far down the line: it parks about until its turn.
    assert busy_park_s(0.2, 12.0, 3600.0) == 12.0
    # Its deadline is nearer than its turn: back before it, for a last try.
    assert busy_park_s(0.2, 12.0, 10.0) == pytest.approx(9.0)
    # Never sooner than a deployment may have room.
    assert busy_park_s(5.0, 12.0, 4.0) == 5.0
