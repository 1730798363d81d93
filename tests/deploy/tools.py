"""The tools the deploy tests run (harness/tools.py says where each comes from): a missing one
fails the test, never skips it, and says how to get it."""

from __future__ import annotations

import pytest

from harness.tools import MissingTool, system_tool


def require(tool: str) -> str:
    """The tool's path, or a failed test that names the package it comes with."""
    try:
        return system_tool(tool)
    except MissingTool as missing:
        pytest.fail(str(missing), pytrace=False)
