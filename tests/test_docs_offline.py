"""The API's docs pages work on a private network: /docs (Swagger UI) and /redoc load every asset
from the API itself, without a key, never from a CDN. In-process; tests/test_browser.py renders
them in a real browser with every other host unreachable."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from broker_config.settings import Settings
from headrace.stack import DEFAULT_CONFIG

# What a page asks the browser to load: tags' src/href, ReDoc's spec-url, Swagger UI's `url:`.
_ASSET = re.compile(r"""(?:\bsrc|\bhref|spec-url)="([^"]+)"|\burl:\s*'([^']+)'""")
_TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png", ".json": "application/json"}


@pytest.fixture
def client(make_database_url: Callable[[str], str], redis_url: str, tmp_path: Path) -> Iterator[TestClient]:
    config = tmp_path / "headrace.toml"
    config.write_text(DEFAULT_CONFIG.format(sim="http://127.0.0.1:9", key_env="SIM_KEY"))
    settings = Settings(database_url=make_database_url("sqlite"), redis_url=redis_url, config=config)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def _assets(html: str) -> list[str]:
    return [a or b for a, b in _ASSET.findall(html)]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_a_docs_page_loads_only_same_origin_assets_served_without_a_key(
    client: TestClient, page: str
) -> None:
    """The page names no other host, and each asset it names answers 200 with its content type."""
    response = client.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "://" not in response.text, response.text  # no CDN, no font host, no absolute URL
    assets = _assets(response.text)
    assert "/openapi.json" in assets and any(a.endswith(".js") for a in assets), assets
    for url in assets:
        assert url.startswith("/") and not url.startswith("//"), url
        asset = client.get(url)
        assert asset.status_code == 200, (url, asset.status_code)
        assert asset.headers["content-type"].startswith(_TYPES[Path(url).suffix]), (url, asset.headers)
        assert len(asset.content) > 0


def test_swagger_ui_assets_are_the_packaged_ones_and_a_missing_one_is_a_json_404(client: TestClient) -> None:
    """Swagger UI's script and stylesheet are the real bundle (v5, which renders OpenAPI 3.1), the
    OAuth2 redirect page is served too, and a missing asset gets the API's usual JSON 404."""
    assets = _assets(client.get("/docs").text)
    script = client.get(next(a for a in assets if a.endswith("swagger-ui-bundle.js"))).text
    assert "SwaggerUIBundle" in script and len(script) > 500_000
    assert client.get("/openapi.json").json()["openapi"].startswith("3.1")
    redirect = client.get("/docs/oauth2-redirect")
    assert redirect.status_code == 200 and "://" not in redirect.text
    static_dir = next(a for a in assets if a.endswith(".css")).rsplit("/", 1)[0]
    missing = client.get(f"{static_dir}/no-such-file.js")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
