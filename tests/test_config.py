"""The deployments file: every mistake is reported with the file, the entry and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker_config.deployments import ConfigError, load_config, parse_config

GOOD = """
[[deployments]]
name = "openai-mini"
provider = "openai"
model = "gpt-4o-mini"
base_url = "http://127.0.0.1:9100/v1"
api_key_env = "OPENAI_API_KEY"
rpm = 500
tpm = 200000

[[deployments]]
name = "claude-haiku"
provider = "anthropic"
model = "claude-3-5-haiku-latest"
itpm = 50000
otpm = 10000
input_price_per_mtok = 0.8
output_price_per_mtok = 4

[[routes]]
name = "fast"
deployments = ["openai-mini", "claude-haiku"]
"""


def test_the_documented_shape_loads() -> None:
    config = parse_config(GOOD, Path("h.toml"))
    assert config.resolve("fast").deployments == ("openai-mini", "claude-haiku")  # type: ignore[union-attr]
    assert config.deployment("claude-haiku").otpm == 10000


def test_a_model_or_deployment_name_is_a_route_of_its_own() -> None:
    """Producers may name a deployment or a model a deployment serves; unknown names resolve to None."""
    config = parse_config(GOOD, Path("h.toml"))
    assert config.resolve("gpt-4o-mini").deployments == ("openai-mini",)  # type: ignore[union-attr]
    assert config.resolve("claude-haiku").deployments == ("claude-haiku",)  # type: ignore[union-attr]
    assert config.resolve("nope") is None
    assert config.model_names()[:1] == ["fast"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ('provider = "anthropic"', 'provider = "azure"'),
            "deployments[1] (name='claude-haiku'): field 'provider'",
        ),
        (("rpm = 500", "rpm = 0"), "deployments[0] (name='openai-mini'): field 'rpm'"),
        (("tpm = 200000", "tmp = 200000"), "deployments[0] (name='openai-mini'): field 'tmp': Extra inputs"),
        (
            ('"openai-mini", "claude-haiku"]', '"openai-mini", "claude-opus"]'),
            "routes[0] (name='fast'): field 'deployments': unknown deployment 'claude-opus'",
        ),
        (('name = "claude-haiku"', 'name = "openai-mini"'), "field 'name': duplicate name"),
        (("output_price_per_mtok = 4", ""), "must be given together"),
        (('model = "gpt-4o-mini"', ""), "deployments[0] (name='openai-mini'): field 'model': Field required"),
    ],
    ids=["provider", "rpm", "typo", "unknown-deployment", "duplicate", "half-price", "missing-model"],
)
def test_mistakes_name_the_file_the_entry_and_the_field(change: tuple[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(GOOD.replace(*change, 1), Path("conf/h.toml"))
    message = str(info.value)
    assert message.startswith("conf/h.toml") and expected in message, message


def test_invalid_toml_and_missing_files_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"h.toml: not valid TOML"):
        parse_config("[[deployments]\n", Path("h.toml"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_tenant_ceilings_are_read_and_checked() -> None:
    text = GOOD + '\n[[tenants]]\nname = "acme"\nrpm = 10\ntpm = 5000\n'
    config = parse_config(text, Path("h.toml"))
    assert config.tenant_limits("acme").limits() == {"requests": 10, "tokens": 5000}  # type: ignore[union-attr]
    assert config.tenant_limits("globex") is None
    with pytest.raises(ConfigError, match=r"tenants\[1\] \(name='acme'\): field 'name': duplicate name"):
        parse_config(text + '\n[[tenants]]\nname = "acme"\nrpm = 5\n', Path("h.toml"))


def test_each_provider_has_the_limits_it_meters() -> None:
    """OpenAI: requests and tokens. Anthropic: requests, input and output tokens (tpm without them)."""
    config = parse_config(GOOD, Path("h.toml"))
    assert config.deployment("openai-mini").limits() == {"requests": 500, "tokens": 200000}
    assert config.deployment("claude-haiku").limits() == {
        "requests": 500,
        "input_tokens": 50000,
        "output_tokens": 10000,
    }
