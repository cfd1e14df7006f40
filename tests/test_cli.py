"""The command line as a user meets it: keys, config errors, simulator help."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select

from db.engine import get_database
from db.models import ApiKey
from db.tenants import hash_key


def test_keys_create_prints_the_key_alone_and_stores_its_hash(
    run_cli: Callable[..., str], make_database_url: Callable[[str], str]
) -> None:
    """stdout is the key and nothing else, so scripts can capture it; the ledger has only its hash."""
    url = make_database_url("sqlite")
    key = run_cli("keys", "create", "--tenant", "acme", env={"HEADRACE_DATABASE_URL": url})
    assert key.endswith("\n") and key.count("\n") == 1 and key.startswith("hr_")
    with get_database(url).session() as session:
        assert session.scalars(select(ApiKey.key_hash)).one() == hash_key(key.strip())


def test_keys_create_admin_makes_an_admin_key_and_says_so(
    run_cli: Callable[..., str], make_database_url: Callable[[str], str]
) -> None:
    """--admin: stdout is still the key alone; stderr says it is an admin key; the row is marked."""
    import subprocess

    from headrace.embedded import headrace_command

    url = make_database_url("sqlite")
    env = {"HEADRACE_DATABASE_URL": url}
    done = subprocess.run(
        headrace_command("keys", "create", "--tenant", "ops", "--admin"),
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
        check=True,
    )
    assert done.stdout.startswith("hr_") and done.stdout.count("\n") == 1
    assert "admin key" in done.stderr
    tenant_key = run_cli("keys", "create", "--tenant", "acme", env=env).strip()
    with get_database(url).session() as session:
        admin = dict(session.execute(select(ApiKey.key_hash, ApiKey.admin)).tuples().all())
    assert admin == {hash_key(done.stdout.strip()): True, hash_key(tenant_key): False}


def test_migrate_creates_the_schema(run_cli: Callable[..., str], tmp_path: Path) -> None:
    """`headrace migrate` on an empty SQLite file leaves a ledger keys can be written to."""
    env = {"HEADRACE_DATABASE_URL": f"sqlite:///{tmp_path / 'new.db'}"}
    run_cli("migrate", env=env)
    assert run_cli("keys", "create", "--tenant", "t", env=env).startswith("hr_")


def test_a_bad_deployments_file_stops_the_api_naming_file_entry_and_field(
    run_cli: Callable[..., str], tmp_path: Path
) -> None:
    """The API and workers refuse to start on a bad file, and say where the fault is."""
    config = tmp_path / "bad.toml"
    config.write_text(
        '[[deployments]]\nname = "a"\nprovider = "openai"\nmodel = "m"\n'
        '[[deployments]]\nname = "b"\nprovider = "openia"\nmodel = "m"\n'
        '[[routes]]\nname = "fast"\ndeployments = ["a"]\n'
    )
    for command in (["api", "--port", "1"], ["worker"]):
        message = run_cli(*command, env={"HEADRACE_CONFIG": str(config)}, expect_code=2)
        assert str(config) in message and "deployments[1] (name='b')" in message and "'provider'" in message


def test_a_missing_deployments_file_says_how_to_point_at_one(
    run_cli: Callable[..., str], tmp_path: Path
) -> None:
    message = run_cli("check-config", str(tmp_path / "nope.toml"), expect_code=2)
    assert "not found" in message and "HEADRACE_CONFIG" in message


def test_submit_reports_bad_lines_with_their_numbers(run_cli: Callable[..., str], tmp_path: Path) -> None:
    """Without a reachable API the CLI still fails clearly; with no key it says how to give one."""
    source = tmp_path / "in.jsonl"
    source.write_text('{"custom_id": "a", "body": {}}\n')
    message = run_cli("submit", str(source), expect_code=2)
    assert "HEADRACE_API_KEY" in message


def test_a_worker_refuses_a_visibility_timeout_shorter_than_a_request_can_run(
    run_cli: Callable[..., str],
) -> None:
    """Otherwise the broker would hand a running request to a second worker."""
    root = Path(__file__).resolve().parent.parent
    env = {"HEADRACE_CONFIG": str(root / "headrace.toml"), "HEADRACE_VISIBILITY_TIMEOUT_S": "300"}
    message = run_cli("worker", env=env, expect_code=2)
    assert "HEADRACE_VISIBILITY_TIMEOUT_S=300" in message and "deliver it again" in message


@pytest.mark.slow
def test_keys_secret_is_stable_until_rotated(
    run_cli: Callable[..., str], make_database_url: Callable[[str], str]
) -> None:
    env = {"HEADRACE_DATABASE_URL": make_database_url("sqlite")}
    run_cli("keys", "create", "--tenant", "acme", env=env)
    first = run_cli("keys", "secret", "--tenant", "acme", env=env).strip()
    assert (
        first.startswith("whsec_") and run_cli("keys", "secret", "--tenant", "acme", env=env).strip() == first
    )
    rotated = run_cli("keys", "secret", "--tenant", "acme", "--rotate", env=env).strip()
    assert rotated.startswith("whsec_") and rotated != first
    assert "no tenant named 'nobody'" in run_cli(
        "keys", "secret", "--tenant", "nobody", env=env, expect_code=2
    )
