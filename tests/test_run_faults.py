"""A run under faults, in one process with its own Redis that the tests stop and start: the paid
answer survives Redis going away mid-call, leases decide who runs a request, the keeper brings a
lease back after Redis lost it, and the sweeps act only on positive evidence."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from kombu import Consumer

from broker_config import keys
from broker_config.celery_app import app
from broker_config.publisher import publish_requests
from broker_config.queues import ALL_QUEUES, broker_lists, broker_unacked_key
from db.engine import Database
from db.models import LlmRequest
from headrace.embedded import start_redis
from tests.pipeline_deps import pipeline_deps
from tests.simulator_fixture import SimControl
from tests.test_pipeline import KEY_ENV, _config, _state, _submit
from workers import ledger
from workers.housekeeping import LostMessageSweep, OrphanSweep
from workers.leases import LeaseKeeper, Leases
from workers.pipeline import Deps, recovery_claim, run_request


class PrivateRedis:
    """A redis-server of this test's own, which it may stop and start on the same port."""

    def __init__(self, home: Path, *, appendonly: bool = True) -> None:
        self.home, self.appendonly = home, appendonly
        self.proc, self.url = start_redis(home, appendonly=appendonly)
        self.port = int(self.url.rsplit(":", 1)[1].split("/")[0])

    def stop(self) -> None:
        self.proc.stop()

    def start(self) -> None:
        self.proc, _ = start_redis(self.home, port=self.port, appendonly=self.appendonly)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture
def client(private_redis: PrivateRedis) -> Iterator[redis_lib.Redis]:
    # Short timeouts and no retries: a stopped server is noticed at once.
    connection = redis_lib.Redis.from_url(private_redis.url, socket_timeout=2, socket_connect_timeout=2)
    yield connection
    connection.close()


@pytest.fixture
def deps(
    db: Database,
    sim: SimControl,
    monkeypatch: pytest.MonkeyPatch,
    client: redis_lib.Redis,
    private_redis: PrivateRedis,
) -> Deps:
    monkeypatch.setenv(KEY_ENV, "sk-test")
    config = _config(sim.url)
    return pipeline_deps(db, config, client, broker_url=private_redis.url, call_timeout_s=10, lease_ttl_s=3)


def _calls(sim: SimControl) -> int:
    return sum(sim.stats()["received"].values())


def test_redis_lost_during_a_call_loses_neither_the_answer_nor_its_cost(
    deps: Deps, sim: SimControl, private_redis: PrivateRedis
) -> None:
    """Redis stops while the provider is answering. The answer was paid for: the attempt row gets
    its usage and cost and the request ends succeeded, although settling the bucket, recording
    the breaker and releasing the lease all fail afterwards. (Before, the Redis error sent the
    request back to the outbox with its attempt in flight, and the rerun paid again.)"""
    (rid,) = _submit(deps, "single", "[[sim:latency_ms=1500]] hi")
    run = threading.Thread(target=run_request, args=(rid, deps))
    run.start()
    deadline = time.monotonic() + 10
    while _calls(sim) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    private_redis.stop()
    run.join(60)
    assert not run.is_alive()
    request, attempts, batch = _state(deps, rid)
    assert request.status == "succeeded" and [a.outcome for a in attempts] == ["success"]
    assert attempts[0].cost_usd is not None and attempts[0].cost_usd > 0 and not attempts[0].cost_estimated
    assert batch.succeeded_count == 1 and batch.cost_usd == attempts[0].cost_usd and _calls(sim) == 1


def test_a_delivery_while_the_run_lives_does_nothing_and_after_it_died_takes_over(
    deps: Deps, sim: SimControl, client: redis_lib.Redis
) -> None:
    """A live run holds the lease: another delivery makes no call and changes nothing. Once its
    lease has expired (the run died mid-call), the next delivery takes the request over at once,
    and the dead run's call gets its cost row, estimated."""
    (rid,) = _submit(deps, "single")
    lease = deps.leases.acquire(rid)
    assert lease is not None
    assert ledger.begin_run(deps.db, rid, lease.token, recovery_claim(deps)) is not None
    assert ledger.begin_attempt(
        deps.db,
        rid,
        lease.token,
        deployment="oa",
        provider="openai",
        model="m",
        estimated_input_tokens=9,
        worker="w",
    )
    run_request(rid, deps)  # a duplicate delivery
    request, attempts, _ = _state(deps, rid)
    assert (request.status, request.lease, len(attempts), _calls(sim)) == ("running", lease.token, 1, 0)
    client.delete(keys.lease(rid))  # what its expiry does once nothing refreshes it
    run_request(rid, deps)
    request, attempts, _ = _state(deps, rid)
    assert request.status == "succeeded" and [a.outcome for a in attempts] == ["lost", "success"]
    assert attempts[0].cost_estimated and attempts[0].cost_usd is not None and _calls(sim) == 1


def test_a_duplicate_of_a_request_handed_back_meanwhile_comes_back_instead_of_being_dropped(
    deps: Deps, sim: SimControl, client: redis_lib.Redis
) -> None:
    """A run has just handed its request back to the queue but not yet let go of its lease, and a
    delivery of that request arrives: it is not dropped (it may be the message the request needs)
    but parked for a moment, so the request can never be left queued with no message anywhere."""
    (rid,) = _submit(deps, "single")
    lease = deps.leases.acquire(rid)
    assert lease is not None
    ledger.begin_run(deps.db, rid, lease.token, recovery_claim(deps))
    assert ledger.defer_run(deps.db, rid, lease.token)  # handed back; the lease is still held
    run_request(rid, deps)
    assert client.zscore(keys.delayed_requests(), f"default|{rid}") is not None
    assert _state(deps, rid)[0].status == "queued" and _calls(sim) == 0
    deps.leases.release(lease)
    client.zadd(keys.delayed_requests(), {f"default|{rid}": 0})  # its moment has passed
    published: list[tuple[str, str]] = []
    assert deps.delays.publish_due(published.extend) == 1 and published == [(rid, "default")]
    run_request(rid, deps)
    assert _state(deps, rid)[0].status == "succeeded" and _calls(sim) == 1


@pytest.mark.slow
def test_the_keeper_keeps_leases_alive_writes_back_lost_ones_and_notices_a_takeover(tmp_path: Path) -> None:
    """Refreshed every quarter TTL on its own connection; after a restart of a Redis that kept
    nothing, the keeper writes the lease again within the TTL; a lease another run holds is
    marked lost, and is never overwritten."""
    server = PrivateRedis(tmp_path / "volatile", appendonly=False)
    client = redis_lib.Redis.from_url(server.url, socket_timeout=1, socket_connect_timeout=1)
    leases = Leases(client, ttl_s=2)
    keeper = LeaseKeeper(
        leases, redis_lib.Redis.from_url(server.url, socket_timeout=1, socket_connect_timeout=1)
    )
    keeper.start()
    try:
        mine, theirs = leases.acquire("r1"), leases.acquire("r2")
        assert mine is not None and theirs is not None and leases.acquire("r1") is None
        time.sleep(3)  # longer than the TTL: alive only because it is refreshed
        assert client.get(keys.lease("r1")) == mine.token.encode()
        server.stop()
        server.start()  # no append-only file: every key is gone
        assert client.get(keys.lease("r1")) is None
        client.set(keys.lease("r2"), "another-run", px=60_000)
        deadline = time.monotonic() + 2
        while client.get(keys.lease("r1")) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get(keys.lease("r1")) == mine.token.encode()
        time.sleep(1)
        assert theirs.lost and not mine.lost and client.get(keys.lease("r2")) == b"another-run"
        leases.release(mine)
        assert client.get(keys.lease("r1")) is None
    finally:
        keeper.stop()
        server.stop()


def test_a_lease_released_while_its_refresh_is_on_the_way_is_not_written_back(redis: redis_lib.Redis) -> None:
    """The keeper takes the held leases, and the run releases its lease before the refresh lands:
    the refresh writes the key again (it writes back keys Redis lost), and the refresh must then
    delete it, or every delivery of the request bounces off it for a whole TTL."""
    leases = Leases(redis, ttl_s=15)
    lease = leases.acquire("r1")
    assert lease is not None

    class ReleasedMeanwhile:
        """The keeper's connection: the run releases its lease just before the refresh executes."""

        def __init__(self) -> None:
            self.first = True

        def pipeline(self, transaction: bool = False) -> Any:
            pipe = redis.pipeline(transaction=transaction)
            execute = pipe.execute

            def late() -> Any:
                if self.first:
                    self.first = False
                    assert lease is not None
                    leases.release(lease)
                    assert redis.get(keys.lease("r1")) is None
                return execute()

            pipe.execute = late  # type: ignore[method-assign]
            return pipe

    leases.refresh(ReleasedMeanwhile())  # type: ignore[arg-type]
    assert redis.get(keys.lease("r1")) is None
    assert leases.acquire("r1") is not None


def test_the_orphan_sweep_requeues_a_dead_run_only_once_its_lease_stays_gone(
    deps: Deps, client: redis_lib.Redis
) -> None:
    """A lease missing on one sighting may be a Redis restart its keeper has not repaired yet:
    the sweep requeues only what stays missing for the confirmation time, and never a request
    whose lease came back meanwhile."""
    dead, revived = _submit(deps, "single", n=2)
    tokens = {}
    for rid in (dead, revived):
        lease = deps.leases.acquire(rid)
        assert lease is not None
        ledger.begin_run(deps.db, rid, lease.token, recovery_claim(deps))
        tokens[rid] = lease.token
    client.delete(keys.lease(dead), keys.lease(revived))
    sweep = OrphanSweep(deps.db, deps.leases, recovery_claim(deps), confirm_s=0.5)
    assert sweep() == 0
    client.set(keys.lease(revived), tokens[revived], px=5000)  # its keeper wrote it back
    time.sleep(0.6)
    assert sweep() == 1
    assert _state(deps, dead)[0].status == "queued" and _state(deps, dead)[0].published_at is None
    assert _state(deps, revived)[0].status == "running"


def test_the_lost_message_sweep_requeues_only_what_no_live_worker_will_take(
    deps: Deps, client: redis_lib.Redis, private_redis: PrivateRedis
) -> None:
    """Six queued requests published long ago: one waits in a broker list, one was just delivered
    to a worker that is about to start it (kombu's unacked hash), one is parked in the delay
    queue, one is leased by a run about to begin, one has no message anywhere, and one was
    delivered long ago to a worker that died with it (kombu would give it back only after the
    30-minute visibility timeout). The last two go back to the outbox, and only once they have
    stayed so for the confirmation time."""
    waiting, reserved, parked, leased, lost, taken_away = _submit(deps, "single", n=6)
    client.delete(*broker_lists())  # as if every message the batch's submission sent were lost
    with deps.db.write() as session:
        for row in session.query(LlmRequest).filter(LlmRequest.batch_id == _state(deps, lost)[2].id):
            row.published_at = row.created_at.replace(year=2000)
    with app.connection_for_read() as connection:
        taken: list[object] = []
        queues = [q for q in app.amqp.queues.values() if q.name in ALL_QUEUES]
        with Consumer(
            connection, queues=queues, callbacks=[lambda _body, msg: taken.append(msg)], prefetch_count=2
        ):
            publish_requests([(taken_away, "default")])
            connection.drain_events(timeout=5)
            time.sleep(2.1)  # delivered 2 s ago, never started: its worker is gone
            publish_requests([(reserved, "default")])
            connection.drain_events(timeout=5)
            # Delivered and not acknowledged: in kombu's unacked hash, in no list.
            assert len(taken) == 2 and client.hlen(broker_unacked_key()) == 2
            assert sum(client.llen(name) for name in broker_lists()) == 0
            publish_requests([(waiting, "default")])
            deps.delays.park(parked, "default", 300)
            assert deps.leases.acquire(leased) is not None
            sweep = LostMessageSweep(deps.db, client, deps.leases, older_than_s=2.0)
            assert sweep() == 0  # one sighting is not proof
            time.sleep(1.1)
            assert sweep() == 2
    states = {rid: _state(deps, rid)[0] for rid in (waiting, reserved, parked, leased, lost, taken_away)}
    assert states[lost].published_at is None and states[taken_away].published_at is None
    assert all(states[rid].published_at is not None for rid in (waiting, reserved, parked, leased))


def test_a_request_parked_again_while_its_message_was_being_published_stays_parked(
    deps: Deps, client: redis_lib.Redis
) -> None:
    """The delay queue publishes a due request; a worker runs it at once and parks it again before
    the publisher removes what it claimed. That new parking must survive, or the request is
    queued with no message anywhere (seen: 28 of 1,000 requests stranded after an outage)."""
    deps.delays.park("req_x", "default", 0)

    def publish_and_a_worker_parks_it_again(pairs: object) -> None:
        deps.delays.park("req_x", "default", 30)

    assert deps.delays.publish_due(publish_and_a_worker_parks_it_again) == 1
    score = client.zscore(keys.delayed_requests(), "default|req_x")
    now_s, _ = client.time()
    assert score is not None and 25_000 < score - now_s * 1000 <= 31_000
    published: list[object] = []
    client.zadd(keys.delayed_requests(), {"default|req_x": 0})
    assert deps.delays.publish_due(published.append) == 1 and client.zcard(keys.delayed_requests()) == 0
