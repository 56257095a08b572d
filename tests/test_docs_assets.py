"""/docs and /redoc work air-gapped: every script, stylesheet and icon they load is served by the API itself."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient

from services.scheduler.api import DOCS_ASSETS, create_app
from services.scheduler.core import Scheduler
from shared.bus.memory import MemoryBus
from shared.store.memory import MemoryStore


class _References(HTMLParser):
    """Every URL an HTML page makes the browser fetch: src and href attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


@pytest.fixture
def client() -> TestClient:
    return TestClient(create_app(Scheduler(MemoryBus(), MemoryStore()), "token"))


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_local_assets(client: TestClient, page: str) -> None:
    response = client.get(page)
    assert response.status_code == 200
    html = response.text
    parser = _References()
    parser.feed(html)
    assert parser.urls, f"{page} references no assets"
    # Nothing absolute anywhere in the page, in attributes or in its inline script (fonts, validator, CDN).
    assert re.findall(r"(?:https?:)?//[A-Za-z0-9.-]+\.[a-z]{2,}", html) == []
    for url in parser.urls:
        assert url.startswith(DOCS_ASSETS + "/"), url
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert len(asset.content) > 1000, url  # the real bundle, not an error page
    kinds = {url.rsplit(".", 1)[-1] for url in parser.urls}
    assert "js" in kinds
    if page == "/docs":
        assert "css" in kinds
        assert "validatorUrl" in html and '"validatorUrl": null' in html  # no badge fetched from swagger.io


def test_docs_pages_point_at_the_served_openapi(client: TestClient) -> None:
    assert "/openapi.json" in client.get("/docs").text
    assert "/openapi.json" in client.get("/redoc").text
    assert client.get("/openapi.json").status_code == 200
    assert client.get(DOCS_ASSETS + "/no-such-file.js").status_code == 404
