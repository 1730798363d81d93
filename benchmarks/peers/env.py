"""The peers' own virtualenv, `.venv/peers`: LitServe, Ray Serve and BentoML, never the service's.

    python -m benchmarks.peers.env   # creates it, or says it is current; prints how long it took

It reuses this interpreter's torch, diffusers, numpy and Pillow (.venv's) through a .pth file and
pins them to the versions found there: a second copy of torch would be another 200 MB, and an
unpinned torch requirement pulls CUDA wheels. So pip installs only the three frameworks and
their own dependencies (about 45 s and 360 MB here); where one of them needs another version of
a package .venv has, the peers' copy shadows .venv's for the peers alone. A stamp records what
was installed, so a second call costs nothing until requirements.txt changes.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import subprocess
import sys
import sysconfig
import time
import venv
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PEERS_VENV = PROJECT_ROOT / ".venv" / "peers"
REQUIREMENTS = Path(__file__).with_name("requirements.txt")
# What the peers take from .venv, each pinned to .venv's version.
SHARED = ("torch", "diffusers", "transformers", "numpy", "pillow")


def python() -> Path:
    return PEERS_VENV / "bin" / "python"


def _pins() -> str:
    return "".join(f"{name}=={importlib.metadata.version(name)}\n" for name in SHARED)


def _fingerprint(pins: str) -> str:
    return hashlib.sha256((REQUIREMENTS.read_text() + pins + sys.prefix).encode()).hexdigest()


def ensure(log: bool = True) -> Path:
    """The peers' interpreter, installed first when missing or out of date."""
    pins = _pins()
    stamp = PEERS_VENV / ".installed"
    fingerprint = _fingerprint(pins)
    if stamp.exists() and stamp.read_text() == fingerprint and python().exists():
        return python()
    PEERS_VENV.parent.mkdir(parents=True, exist_ok=True)
    # Two callers at once (make bench and a test) would otherwise build one venv twice over.
    with open(PEERS_VENV.parent / "peers.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and stamp.read_text() == fingerprint and python().exists():
            return python()
        started = time.monotonic()
        if log:
            print(f"installing LitServe, Ray Serve and BentoML into {PEERS_VENV} "
                  "(first time: about a minute)", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(PEERS_VENV)
        site = Path(sysconfig.get_path("purelib", vars={"base": str(PEERS_VENV)}))
        # addsitedir, not a bare path: .venv's own .pth files (the project's editable install)
        # are read too; appended, so the peers' own packages come first.
        shared = sysconfig.get_path("purelib")
        (site / "imagegen-venv.pth").write_text(f"import site; site.addsitedir({shared!r})\n")
        constraints = PEERS_VENV / "constraints.txt"
        constraints.write_text(pins)
        subprocess.run(
            [str(python()), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "-r", str(REQUIREMENTS), "-c", str(constraints)],
            check=True,
        )
        stamp.write_text(fingerprint)
        if log:
            print(f"peers installed in {time.monotonic() - started:.0f} s", flush=True)
    return python()


if __name__ == "__main__":
    ensure()
    print(python())
