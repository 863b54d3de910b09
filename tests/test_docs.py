"""The documentation: every Python code block of README.md and docs/ runs as written, and the site
builds with warnings as errors.

Code blocks follow pytest-markdown-docs' conventions (superfences syntax): a block marked
``{.python continuation}`` continues the blocks before it on the same page (one namespace, in
order); ``{.python notest}`` is shown but not run. Each chain of blocks runs once, here in one
test per page, which is what ``python -m pytest --markdown-docs --markdown-docs-syntax=superfences
README.md docs/`` runs block by block.
"""
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _chains(page: Path) -> list:
    """The code of each chain of blocks (a block and the continuation blocks after it)."""
    plugin = pytest.importorskip("pytest_markdown_docs.plugin")
    from markdown_it import MarkdownIt

    tests = list(plugin.extract_fence_tests(MarkdownIt(config="commonmark"), page.read_text("utf8"),
                                            source_path=page, start_line_offset=0,
                                            markdown_type="md",
                                            fence_syntax=plugin.FenceSyntax.superfences))
    codes = [t.source for t in tests]
    return [code for code, nxt in zip(codes, codes[1:] + [None])
            if nxt is None or not nxt.startswith(code)]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_code_blocks_run(page, tmp_path, monkeypatch):
    from analysis import operator
    monkeypatch.setattr(operator, "_REGISTRY", dict(operator._REGISTRY))  # pages may register
    chains = _chains(page)
    monkeypatch.chdir(tmp_path)  # files the examples write land in a temporary folder
    for code in chains:
        torch.manual_seed(0)
        exec(compile(code, str(page), "exec"), {"__name__": "__main__"})


def test_continuation_blocks_share_the_page_namespace(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```python\nx = 1\n```\n\ntext\n\n```{.python continuation}\nassert x == 1\n"
                    "```\n\n```{.python notest}\nraise SystemExit\n```\n\n```python\ny = 2\n```\n")
    first, second = _chains(page)  # line numbers are the page's, for tracebacks
    assert first.splitlines()[1::6] == ["x = 1", "assert x == 1"] and first.strip().count("\n") == 6
    assert second.splitlines()[15:] == ["y = 2"] and second.strip() == "y = 2"


def _has(module):
    return importlib.util.find_spec(module) is not None


@pytest.mark.slow
@pytest.mark.skipif(not all(map(_has, ("mkdocs", "material", "mkdocstrings_handlers.python"))),
                    reason="the docs extra is not installed")
def test_the_site_builds_strictly_and_documents_every_public_name(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q",
                          "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    for package in ("analysis", "landscape", "optim"):
        html = (site / "reference" / package / "index.html").read_text("utf8")
        ids = set(re.findall(r'id="([^"]+)"', html))
        missing = [name for name in importlib.import_module(package).__all__
                   if f"{package}.{name}" not in ids]
        assert not missing, f"{package}: public names missing from the API reference: {missing}"
