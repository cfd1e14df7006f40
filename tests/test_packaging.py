"""What ships beside the code: the compose file's production shape, and the README's commands."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_compose_has_the_production_shape() -> None:
    """redis with AOF, postgres, a one-shot migrate, api, a scalable worker, flower."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "postgres", "migrate", "api", "worker", "flower"} <= set(services)
    assert "--appendonly yes" in services["redis"]["command"] and "noeviction" in services["redis"]["command"]
    assert services["migrate"]["command"] == ["migrate"] and services["migrate"]["restart"] == "no"
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["worker"]["deploy"]["replicas"] >= 1 and "ports" not in services["worker"]
    env = services["api"]["environment"]
    assert env["HEADRACE_DATABASE_URL"].startswith("postgresql+psycopg://")


def test_readme_starts_with_the_demo_and_the_ci_test_command() -> None:
    """The two commands come first, and CI runs exactly the README's test command."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, re.S)
    assert "headrace demo" in blocks[0] and "pip install" in blocks[0]
    test_command = blocks[1].strip().splitlines()[-1]
    assert "pytest" in test_command
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()
