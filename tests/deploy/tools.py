"""The system tools the deploy tests run; `make test` installs them (deploy/install-tools.sh)."""

from __future__ import annotations

import shutil

import pytest

PACKAGES = {"promtool": "prometheus", "prometheus": "prometheus", "docker-compose": "docker-compose"}


def require(tool: str) -> str:
    """The tool's path; a missing tool fails the test (never skips it) and says how to get it."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(
            f"`{tool}` is not installed: it comes with the Debian package {PACKAGES[tool]!r}. "
            "`make test` installs it when run as root (deploy/install-tools.sh); otherwise "
            f"`apt-get install {PACKAGES[tool]}`.",
            pytrace=False,
        )
    return path
