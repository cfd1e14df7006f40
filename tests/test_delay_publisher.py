"""Each worker publishes parked requests on a thread that sleeps until the next one is due: woken at
once when its own process parks one, looking at least every idle_check_s for the others', and
costing an idle pool about one script a second instead of four per worker."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import redis as redis_lib

from broker_config import keys
from workers.delays import DelayPublisher, DelayQueue


class Published:
    def __init__(self) -> None:
        self.pairs: list[tuple[str, str]] = []
        self.at: dict[str, float] = {}
        self.changed = threading.Event()

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> None:
        for request_id, priority in pairs:
            self.pairs.append((request_id, priority))
            self.at[request_id] = time.monotonic()
        self.changed.set()


def claims(client: redis_lib.Redis) -> int:
    stats = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval"))


def test_a_request_parked_here_is_published_when_due_though_the_publisher_slept(
    redis: redis_lib.Redis,
) -> None:
    delays = DelayQueue(redis)
    published = Published()
    publisher = DelayPublisher(delays, published, idle_check_s=30.0)
    publisher.start()
    try:
        time.sleep(0.2)  # its first round found nothing: it sleeps for 30 s
        parked_at = time.monotonic()
        delays.park("req_a", "bulk", 0.4)
        deadline = time.monotonic() + 5
        while "req_a" not in published.at and time.monotonic() < deadline:
            time.sleep(0.02)
        assert published.pairs == [("req_a", "bulk")]
        # Not before its time (less the round's 50 ms), and not the 30 s sleep either.
        assert 0.3 <= published.at["req_a"] - parked_at < 1.5
        assert redis.zcard(keys.delayed_requests()) == 0
    finally:
        publisher.stop()
        publisher.join(5)
    assert not publisher.is_alive()


def test_a_request_parked_by_another_process_is_published_within_the_idle_check(
    redis: redis_lib.Redis,
) -> None:
    published = Published()
    publisher = DelayPublisher(DelayQueue(redis), published, idle_check_s=0.5)
    publisher.start()
    try:
        time.sleep(0.1)
        DelayQueue(redis).redis.zadd(keys.delayed_requests(), {"default|req_b": 0})  # no event here
        assert published.changed.wait(3)
        assert published.pairs == [("req_b", "default")]
    finally:
        publisher.stop()
        publisher.join(5)


def test_an_idle_publisher_asks_redis_about_once_per_idle_check(redis: redis_lib.Redis) -> None:
    publisher = DelayPublisher(DelayQueue(redis), Published(), idle_check_s=1.0)
    before = claims(redis)
    publisher.start()
    time.sleep(2.5)
    publisher.stop()
    publisher.join(5)
    assert claims(redis) - before <= 4  # the old poller: 10 in that time


def test_the_publisher_outlives_an_unreachable_redis() -> None:
    gone = redis_lib.Redis(port=1, socket_connect_timeout=0.1)
    publisher = DelayPublisher(DelayQueue(gone), Published(), idle_check_s=0.1)
    publisher.start()
    time.sleep(0.5)
    assert publisher.is_alive()
    publisher.stop()
    publisher.join(5)
    assert not publisher.is_alive()
