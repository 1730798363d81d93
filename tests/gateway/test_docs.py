"""GET /docs: Swagger UI served by the gateway itself (no CDN), open without a key; and in a real
headless Chromium against a real gunicorn gateway with the session's Triton: the page renders the
operations, and "Try it out" after "Authorize" sends the key and gets a 200 from /generate."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from playwright.sync_api import Page, sync_playwright

from gateway import Settings
from gateway.docs import CSP
from tests.deploy.tools import require
from tests.gateway.process import GunicornGateway

KEY = "docs-test-key-0123456789"
TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
# Where the screenshot goes: a folder given by the caller (to look at it), else the test's own.
SCREENSHOT_DIR = os.environ.get("DOCS_SCREENSHOT_DIR")


class Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.links.append(value)


@pytest.fixture
def app(make_app: Any, base_settings: Settings) -> Flask:
    return make_app(base_settings.replace(api_keys=(KEY,)))  # type: ignore[no-any-return]


def test_the_page_and_every_asset_it_loads_come_from_the_gateway(app: Flask) -> None:
    client = app.test_client()
    page = client.get("/docs")  # no key: open, like /openapi.json
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert page.headers["Content-Security-Policy"] == CSP
    parser = Links()
    parser.feed(page.get_data(as_text=True))
    assert len(parser.links) == 5
    for link in parser.links:
        assert link.startswith("docs/assets/"), link  # relative, same origin: no CDN
        asset = client.get(f"/{link}")
        assert asset.status_code == 200, link
        assert asset.mimetype == TYPES[Path(link).suffix], link
        assert asset.headers["X-Content-Type-Options"] == "nosniff"
    assert b"SwaggerUIBundle" in client.get("/docs/assets/swagger-ui-bundle.js").data


def test_only_the_listed_assets_are_served(app: Flask) -> None:
    client = app.test_client()
    for name in ("index.html", "oauth2-redirect.html", "VERSION", "docs.html"):
        assert client.get(f"/docs/assets/{name}").status_code == 404, name
    # A path out of the folder matches no route at all: a key is asked for, nothing is served.
    assert client.get("/docs/assets/..%2Fdocs.py").status_code == 401
    redirected = client.get("/docs/")
    assert redirected.status_code == 308 and redirected.headers["Location"] == "../docs"


@pytest.fixture(scope="module")
def browser_page() -> Iterator[Page]:
    chromium = require("chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium,
            chromium_sandbox=False,
            # No network beyond loopback here: keep Chromium from trying.
            args=["--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic"],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 1600})
        yield page
        browser.close()


def test_a_real_browser_renders_the_operations_and_try_it_out_sends_the_key(
    browser_page: Page, triton_settings: Settings, tmp_path: Path
) -> None:
    gateway = GunicornGateway(
        tmp_path / "gateway.log",
        TRITON_URL=triton_settings.triton_url,
        TRITON_METRICS_URL=triton_settings.triton_metrics_url,
        API_KEYS=KEY,
    )
    page = browser_page
    problems: list[str] = []
    # The browser reports the deliberate 401 below as a failed resource; anything else (a
    # script error, a Content-Security-Policy violation) is a problem.
    page.on("console", lambda m: problems.append(m.text) if m.type == "error"
            and not m.text.startswith("Failed to load resource") else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    statuses: list[int] = []
    page.on("response", lambda r: statuses.append(r.status) if r.url.endswith("/generate") else None)
    with gateway:
        page.goto(f"{gateway.url}/docs")
        generate = page.locator("#operations-default-post_generate")
        generate.wait_for(timeout=30_000)
        paths = page.locator(".opblock-summary-path").all_inner_texts()
        assert "/generate" in paths and "/moderate" in paths
        assert _try_generate(page) == "401"  # no key given yet: the gateway refuses
        page.locator("button.authorize").first.click()
        page.locator(".auth-container input").first.fill(KEY)
        page.locator(".auth-btn-wrapper button.authorize").click()
        page.locator(".auth-btn-wrapper button.btn-done").click()
        shot = Path(SCREENSHOT_DIR or tmp_path) / "docs.png"
        assert _try_generate(page, shot) == "200"  # the key went along
        assert shot.stat().st_size > 10_000
    assert statuses == [401, 200]
    assert problems == []  # no script error, no Content-Security-Policy violation


def _try_generate(page: Page, screenshot: Path | None = None) -> str:
    """Expand POST /generate, "Try it out" with a small inline request, "Execute"; the status
    Swagger UI shows (and a screenshot of the answer when asked)."""
    block = page.locator("#operations-default-post_generate")
    if not block.locator(".opblock-body").is_visible():
        block.locator(".opblock-summary").click()
    # The buttons render with the expanded block ("Try it out", or "Cancel" and "Reset" once in
    # that mode): wait for them rather than count at once, which read 0 before a slow render.
    block.locator("button.try-out__btn").first.wait_for(timeout=30_000)
    try_it = block.locator("button.try-out__btn", has_text="Try it out")
    if try_it.count():  # not yet in "try it out" mode
        try_it.click()
    body = {"prompt": "a lighthouse", "width": 64, "height": 64, "num_inference_steps": 1,
            "upscale": False, "response_format": "b64_json", "enable_nsfw_check": False}
    block.locator("textarea.body-param__text").fill(json.dumps(body))
    block.locator("button.execute").click()
    status = block.locator(".live-responses-table tr.response .response-col_status").first
    status.wait_for(timeout=60_000)
    text = status.inner_text().strip()
    if screenshot is not None:
        block.locator(".live-responses-table").scroll_into_view_if_needed()
        page.screenshot(path=str(screenshot))
    block.locator("button.btn-clear").click()
    return text
