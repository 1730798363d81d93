"""The documentation site (mkdocs.yml, docs/): it builds with --strict, so a broken link or
anchor fails; the parts generated from the code (settings, endpoints, openapi.json) hold what the
code says; the README stays a short front door whose links land; and no file of the project
names an issue number of this project (upstream projects' issues are cited by URL)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from embedded.front_door import settings_table as front_door_settings_table
from gateway.openapi import build_openapi
from gateway.settings import Settings, settings_table

ROOT = Path(__file__).resolve().parents[2]
README_MAX_LINES = 200

# "issue N", "Issue-N", "issue #N", "issues N-M", "(#N)", "#N" with N a number; not an upstream
# URL's ".../issues/N", an HTML character reference ("&#N;") or a CSS colour ("#333;").
ISSUE_NUMBER = re.compile(r"\bissues?[ _-]?#?\d+|(?<![\w/&#])#\d+\b(?!\s*[;}])", re.IGNORECASE)


def _mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict",
         "--config-file", str(config), "--site-dir", str(site)],
        # Pages include sections of README.md, found relative to where mkdocs runs.
        cwd=config.parent,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        # Material's notice about its successor, printed on every build, is not ours to read.
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("site")
    result = _mkdocs_build(ROOT / "mkdocs.yml", folder)
    if result.returncode != 0:
        pytest.fail(f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}")
    return folder


@pytest.fixture(scope="module")
def hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    if spec is None or spec.loader is None:
        pytest.fail("docs/hooks.py cannot be loaded")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Tables(HTMLParser):
    """The text of every table cell of a page, row by row."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _table_rows(page: Path) -> list[list[str]]:
    parser = _Tables()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser.rows


def _as_text(markdown: str) -> str:
    """What a line of inline Markdown reads as once rendered: no backticks, links as their text."""
    return re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", markdown).replace("`", "")


def _pages(nav: object) -> Iterator[str]:
    """The Markdown files a `nav:` names, at any depth."""
    if isinstance(nav, str):
        yield nav
    elif isinstance(nav, dict):
        for entry in nav.values():
            yield from _pages(entry)
    elif isinstance(nav, list):
        for entry in nav:
            yield from _pages(entry)


def test_the_site_builds_with_every_page_of_the_navigation(site: Path) -> None:
    pages = set(_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"]))
    assert {"index.md", "getting-started.md", "api.md", "settings.md", "development.md"} <= pages
    for page in pages:
        assert (site / page).with_suffix(".html").is_file(), page


def _strict_warnings(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The warnings of a build that --strict aborted for them (not one that crashed)."""
    output = result.stdout + result.stderr
    if "in strict mode" not in output:
        return []
    return [line for line in output.splitlines() if line.startswith("WARNING")]


def _copy_sources(folder: Path) -> None:
    shutil.copytree(ROOT / "docs", folder / "docs")
    for name in ("mkdocs.yml", "README.md"):
        shutil.copy(ROOT / name, folder / name)


@pytest.mark.parametrize(
    ("broken", "reported"),
    [
        ("[the API](api.md#no-such-section)", "no-such-section"),
        ("[a page](no-such-page.md)", "no-such-page.md"),
    ],
)
def test_a_broken_link_or_anchor_fails_the_build(
    tmp_path: Path, broken: str, reported: str
) -> None:
    _copy_sources(tmp_path)
    with (tmp_path / "docs" / "index.md").open("a", encoding="utf-8") as page:
        page.write(f"\nSee {broken}.\n")
    result = _mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    assert _strict_warnings(result) and all(reported in w for w in _strict_warnings(result))


def test_a_page_left_out_of_the_navigation_fails_the_build(tmp_path: Path) -> None:
    _copy_sources(tmp_path)
    (tmp_path / "docs" / "forgotten.md").write_text("# Forgotten\n", encoding="utf-8")
    result = _mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    warnings = _strict_warnings(result)
    assert len(warnings) == 1 and 'not included in the "nav"' in warnings[0]
    assert "- forgotten.md" in result.stdout + result.stderr


def test_the_settings_page_lists_every_setting_as_the_code_documents_it(
    site: Path, hooks: ModuleType
) -> None:
    # The page asks the hook for its table...
    markdown = hooks.render((ROOT / "docs" / "settings.md").read_text(encoding="utf-8"))
    for variable, default, meaning in settings_table():
        shown = f"`{default}`" if default else "(empty)"
        assert f"| `{variable}` | {shown} | {meaning} |" in markdown, variable
    # ...and the built page shows one row per setting, each as the code has it.
    rows = {row[0]: row[1:] for row in _table_rows(site / "settings.html") if row}
    for variable, default, meaning in settings_table():
        assert rows.get(variable) == [default or "(empty)", _as_text(meaning)], variable
    # The front door's, likewise (embedded/front_door.py).
    for variable, default, meaning in front_door_settings_table():
        assert rows.get(variable) == [default, _as_text(meaning)], variable
    # And the header, which both tables share.
    assert len(rows) == len(settings_table()) + len(front_door_settings_table()) + 1


def test_the_endpoint_table_lists_every_operation_of_the_openapi_document(site: Path) -> None:
    rows = {(row[0], row[1]) for row in _table_rows(site / "api.html") if len(row) == 5}
    paths = build_openapi(Settings.from_env({}))["paths"]
    expected = {(method.upper(), path) for path, ops in paths.items() for method in ops}
    assert expected <= rows
    assert ("POST", "/generate") in expected


def test_the_request_fields_are_those_the_gateway_validates(site: Path) -> None:
    schemas = build_openapi(Settings.from_env({}))["components"]["schemas"]
    fields = {row[0] for row in _table_rows(site / "api.html") if len(row) == 5}
    assert set(schemas["GenerateRequest"]["properties"]) <= fields
    assert set(schemas["ModerateRequest"]["properties"]) <= fields


def test_the_site_serves_the_gateways_openapi_document(site: Path) -> None:
    served = json.loads(json.dumps(build_openapi(Settings.from_env({}))))
    assert json.loads((site / "openapi.json").read_text(encoding="utf-8")) == served
    assert 'href="openapi.json"' in (site / "api.html").read_text(encoding="utf-8")


def test_the_readme_is_a_short_front_door_whose_links_land(site: Path) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= README_MAX_LINES
    for make in ("make serve", "make demo", "make test", "make docs"):
        assert make in readme
    links = re.findall(r"\]\((docs/[^)#\s]+)(?:#([^)\s]+))?\)", readme)
    assert len(links) >= 8
    for target, anchor in links:
        assert (ROOT / target).is_file(), target
        if anchor:
            page = site / Path(target).relative_to("docs").with_suffix(".html")
            assert f'id="{anchor}"' in page.read_text(encoding="utf-8"), f"{target}#{anchor}"


def test_the_getting_started_page_shows_the_readmes_first_run_table(site: Path) -> None:
    page = (site / "getting-started.html").read_text(encoding="utf-8")
    assert "--8&lt;--" not in page and "--8<--" not in page
    readme_rows = [
        line.split("|")[1].strip().replace("`", "")
        for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
        if line.startswith("| ") and "first time" not in line and "|---" not in line
    ]
    page_rows = [row[0] for row in _table_rows(site / "getting-started.html")]
    assert "the whole suite" in page_rows
    assert set(page_rows) - {"step"} <= set(readme_rows)
    assert "nginx-light" in page  # the one system package the stack needs


def _project_files() -> Iterator[Path]:
    """Every file of the project: tracked, or new and not ignored."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        path = ROOT / name
        if path.is_file():
            yield path


@pytest.mark.parametrize(
    "text",
    [
        "see issue {n}", "Issue-{n}", "issue #{n}", "issues {n}-{m}", "issues {n}–{m}",
        "the figures ({n} and (#{m}))", "fixed in #{n}.", "(Issue_{n})",
    ],
)
def test_the_issue_pattern_finds_an_issue_number(text: str) -> None:
    assert ISSUE_NUMBER.search(text.format(n=15, m=14)), text


@pytest.mark.parametrize(
    "text",
    [
        "a report (https://github.com/triton-inference-server/server/issues/6055) says",
        "tissue 5", "the issue says", "x &#8212; y", "color: #333;", "tests/test_issuer.py",
    ],
)
def test_the_issue_pattern_leaves_other_text_alone(text: str) -> None:
    assert not ISSUE_NUMBER.search(text), text


def test_no_file_names_an_issue_number_of_this_project() -> None:
    found = []
    for path in _project_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if ISSUE_NUMBER.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)
