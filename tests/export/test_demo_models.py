"""The demo-model builder is offline, deterministic and labels what it builds."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from export.demo_models import build
from export.nsfw import DEMO_MARKER


def digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.suffix in {".safetensors", ".json", ".txt"}
    }


def test_two_builds_give_identical_weights(tmp_path: Path) -> None:
    build(tmp_path / "a", tmp_path / "a-repo")
    build(tmp_path / "b", tmp_path / "b-repo")
    first, second = digests(tmp_path / "a"), digests(tmp_path / "b")
    assert any(name.endswith(".safetensors") for name in first)
    assert first == second


def test_demo_models_are_marked_as_demo(demo_models: Path) -> None:
    for name in ("diffusion", "nsfw"):
        marker = json.loads((demo_models / name / DEMO_MARKER).read_text())
        assert marker["demo"] is True and "not a real model" in marker["warning"]


def test_a_second_build_leaves_what_is_there(demo_models: Path) -> None:
    before = digests(demo_models)
    build()
    assert digests(demo_models) == before
