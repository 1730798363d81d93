"""HTTP gateway of the image service: `gunicorn -c gateway/gunicorn.conf.py 'gateway:create_app()'`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.app import create_app
    from gateway.settings import Settings

__all__ = ["Settings", "create_app"]


def __getattr__(name: str) -> Any:
    # Lazy: gunicorn.conf.py reads the settings in the master, which must not import
    # prometheus_client (multi-process mode is fixed at its import) or gRPC (not fork-safe once
    # used) before the workers fork.
    if name == "create_app":
        from gateway.app import create_app

        return create_app
    if name == "Settings":
        from gateway.settings import Settings

        return Settings
    raise AttributeError(f"module 'gateway' has no attribute {name!r}")
