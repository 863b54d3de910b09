"""MkDocs hooks: pages generated from the repository itself, so the site cannot drift from it.

* ``<!-- sharpscape:api PACKAGE -->`` becomes one mkdocstrings block per name in ``PACKAGE.__all__``
  (the public names, whatever the internal module layout).
* ``<!-- sharpscape:reproduction NAME -->`` becomes the verdict, the measured numbers and the checks
  of ``NAME`` in ``figures/results/summary.json``, and its figure.
* ``<!-- sharpscape:verdict NAME -->`` becomes the verdict of ``NAME`` alone (for tables).
* ``<!-- sharpscape:include PATH -->`` includes a Markdown file of the repository (its title
  dropped, links to files outside the site turned into repository paths).
* The committed figures ``figures/results/*.png`` are served under ``reproductions/img/``.
"""
import importlib
import importlib.util
import json
import re
import sys
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "figures" / "results"
MARKER = re.compile(r"<!-- sharpscape:(api|reproduction|verdict|include) (\S+) -->")


def on_files(files, config):
    """Add the committed reproduction figures to the site."""
    for png in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"reproductions/img/{png.name}",
                                    abs_src_path=str(png)))
    return files


def on_page_markdown(markdown, page, config, files):
    """Expand the ``sharpscape:`` markers of a page."""
    expand = {"api": _api, "reproduction": _reproduction, "verdict": _verdict,
              "include": _include}
    return MARKER.sub(lambda m: expand[m.group(1)](m.group(2)), markdown)


def _api(package):
    if str(ROOT) not in sys.path:  # document the checkout the site is built from
        sys.path.insert(0, str(ROOT))
    module = importlib.import_module(package)
    blocks = []
    for name in module.__all__:
        obj = getattr(module, name)
        target = f"{package}.{name}"
        options = ""
        shadowed = importlib.util.find_spec(target) is not None and not hasattr(obj, "__path__")
        if shadowed:  # a submodule of the same name: document the object itself
            target = f"{obj.__module__}.{obj.__qualname__}"
            options = f'\n    options:\n      heading: "{package}.{name}"\n'
            blocks.append(f'<a id="{package}.{name}"></a>\n')
        blocks.append(f"::: {target}{options}\n")
    return "\n".join(blocks)


def _num(value):
    return "–" if value is None else f"{value:.3g}"


def _entry(name):
    return json.loads((RESULTS / "summary.json").read_text())[name]


def _verdict(name):
    return _entry(name)["verdict"]


def _reproduction(name):
    entry = _entry(name)
    lines = [f"**Verdict: {entry['verdict']}** (the committed `{entry['size']}` run, "
             f"{entry['seconds']:.0f} s)", "", f"**The rule, as coded:** {entry['claim']}", "",
             "| measured | value |", "|---|---|"]
    for key, value in entry["measured"].get("headline", {}).items():
        lines.append(f"| {key} | {value} |")
    lines += ["", "| check | verdict | mean | 95% interval | seeds | margin |",
              "|---|---|---|---|---|---|"]
    for check, c in entry["checks"].items():
        lo, hi = c["interval"]
        seeds = (f"{c['seeds_passed']}/{c['n_seeds']} pass" if c["kind"] == "every seed"
                 else f"n={c['n_seeds']} (paired)")
        verdict = f"**{c['verdict']}**" if c["verdict"] == "refuted" else c["verdict"]
        lines.append(f"| {check}: {c['statement']} | {verdict} | {_num(c['mean'])} | "
                     f"[{_num(lo)}, {_num(hi)}] | {seeds} | {c.get('margin') or '–'} |")
    lines += ["", f"![{name}](img/{entry['figure']})", ""]
    return "\n".join(lines)


def _include(path):
    source = ROOT / path
    lines, fenced = [], False
    for line in source.read_text().splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced and line.startswith("# ") and not any(x.strip() for x in lines):
            continue  # the title: the page has its own
        lines.append(line)
    text = "\n".join(lines) + "\n"
    base = source.parent.relative_to(ROOT)

    def link(m):
        target = m.group(2)
        if re.match(r"[a-z]+:|#|/", target):
            return m.group(0)
        return f"{m.group(1)} (`{(base / target).as_posix()}`)"

    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", link, text)
