"""GET /docs: Swagger UI for the served /openapi.json, with "Try it out".

The page and every asset come from this gateway (Swagger UI's files from the pinned
flask-swagger-ui package): no CDN, so it works where the service runs without one. The page's
own script is a file too, so the Content-Security-Policy can forbid inline scripts and every
other origin. With API keys configured, the document declares the bearer scheme on the
endpoints that need it; Swagger UI's "Authorize" takes the key and "Try it out" sends it. The
key stays in the page's memory (Swagger UI's persistAuthorization is off: nothing in storage).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, abort, redirect, send_from_directory

bp = Blueprint("docs", __name__)

_OWN = Path(__file__).with_name("static")
_SWAGGER_UI = Path(str(files("flask_swagger_ui") / "dist"))
# What the page loads, and where each file lives; nothing else is served.
ASSETS = {
    "swagger-ui.css": _SWAGGER_UI,
    "swagger-ui-bundle.js": _SWAGGER_UI,
    "favicon-32x32.png": _SWAGGER_UI,
    "docs.css": _OWN,
    "docs.js": _OWN,
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


@bp.get("/docs")
def page() -> Response:
    response = send_from_directory(_OWN, "docs.html", mimetype="text/html")
    response.headers["Content-Security-Policy"] = CSP
    return response


@bp.get("/docs/")
def page_with_slash() -> Response:
    # Relative, so it works behind a proxy that mounts the gateway under a path.
    return redirect("../docs", code=308)


@bp.get("/docs/assets/<name>")
def asset(name: str) -> Any:
    folder = ASSETS.get(name)
    if folder is None:
        abort(404)
    response = send_from_directory(folder, name, max_age=3600)
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
