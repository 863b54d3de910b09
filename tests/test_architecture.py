"""The layout rules a contributor relies on: short functions, no import cycle (also through
function-local imports), ``optim`` imports only torch, ``analysis`` never imports ``optim``,
nothing imports ``figures``."""
import ast
import io
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ("analysis", "landscape", "optim")
MAX_LINES = 60


def _modules(packages):
    for pkg in packages:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            yield path


def _module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _code_lines(source):
    """Line numbers that hold code: not blank, not only a comment, not inside a docstring."""
    lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                        tokenize.DEDENT, tokenize.ENCODING, tokenize.ENDMARKER):
            continue
        lines.update(range(tok.start[0], tok.end[0] + 1))
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                lines.difference_update(range(body[0].lineno, body[0].end_lineno + 1))
    return lines


def long_functions(packages=LIBRARY, limit=MAX_LINES):
    """``(where, n)`` for every function with more than ``limit`` lines of code."""
    found = []
    for path in _modules(packages):
        source = path.read_text()
        code = _code_lines(source)
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = len([i for i in code if node.lineno <= i <= node.end_lineno])
                if n > limit:
                    found.append((f"{path.relative_to(ROOT)}:{node.lineno} {node.name}", n))
    return found


def _imports(path, name):
    """Every module of the library that ``path`` imports, at any depth of the file."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def import_graph(packages=LIBRARY + ("figures",)):
    names = {_module_name(p): p for p in _modules(packages)}
    graph = {}
    for name, path in names.items():
        graph[name] = {m for m in _imports(path, name) if m in names and m != name}
    return graph


def _cycles(graph):
    """Import cycles between modules, ignoring a package's ``__init__`` re-exports."""
    packages = {n for n in graph if (ROOT / n.replace(".", "/")).is_dir()}
    edges = {n: {m for m in ms if m not in packages}
             for n, ms in graph.items() if n not in packages}
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_no_function_is_longer_than_the_limit():
    assert long_functions() == []


def test_no_import_cycle_also_not_through_function_local_imports():
    assert _cycles(import_graph()) == []


def test_package_dependencies_follow_the_design():
    for path in _modules(("optim",)):
        for mod in _imports(path, _module_name(path)):
            top = mod.split(".")[0]
            assert top in ("", "optim", "torch", "__future__", "math", "typing", "collections",
                           "contextlib", "dataclasses", "functools", "itertools", "warnings",
                           "copy", "numbers", "weakref", "enum", "abc", "os", "sys", "types",
                           "operator", "inspect", "threading"), (path, mod)
    for pkg, banned in (("analysis", ("optim", "landscape", "figures")),
                        ("landscape", ("optim", "figures")), ("optim", ("analysis", "figures"))):
        for path in _modules((pkg,)):
            tops = {m.split(".")[0] for m in _imports(path, _module_name(path))}
            assert not tops & set(banned), (path, tops & set(banned))


@pytest.mark.parametrize("mutant", ["cycle", "long"])
def test_the_checks_catch_what_they_look_for(mutant):
    if mutant == "cycle":
        assert _cycles({"a.x": {"a.y"}, "a.y": {"a.x"}}) == [["a.x", "a.y"]]
    else:
        src = "def f():\n" + "".join(f"    x{i} = {i}\n" for i in range(MAX_LINES + 1))
        code = _code_lines(src)
        assert len([i for i in code if i >= 2]) == MAX_LINES + 1
