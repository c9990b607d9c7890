"""The repository's import structure, read from the source with `ast` (nothing is imported): no lazy imports in the
engine's modules, no import cycle among them, no sys.path edits in tests/ or scripts/, libraries apart from CLIs,
and pyproject.toml listing every top-level module."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# CLIs at the top level: each holds a main() and is run, never imported (except by the tests of that CLI)
CLIS = {"generate", "calibrate", "quantize", "serve"}
# third-party modules a function may import where it is used, because they are optional (listed one by one)
# imported where used: plotting, and inductor (1.3 s to import, needed only when a step is compiled)
OPTIONAL_LAZY = {"matplotlib", "torch._inductor"}


def module_files() -> dict:
    """Dotted module name -> path, for the top-level modules, kernels/ and scripts/."""
    files = {p.stem: p for p in ROOT.glob("*.py")}
    for pkg in ("kernels", "scripts"):
        for p in (ROOT / pkg).glob("*.py"):
            files[pkg if p.stem == "__init__" else f"{pkg}.{p.stem}"] = p
    return files


MODULES = module_files()


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def imports(name: str, tree: ast.Module):
    """(import node, dotted module it names) for every import statement, relative ones resolved."""
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node, a.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".") if package else []
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            for a in node.names:  # `from pkg import mod` imports pkg.mod when that is a module
                yield node, f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base


def project_targets(dotted: str) -> set:
    """The project modules an import of `dotted` runs: the module and its parent packages."""
    parts = dotted.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & MODULES.keys()


def functions_with_imports(tree: ast.Module):
    """(function, import statement) for every import inside a function body (once, under the outermost one)."""
    seen = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in seen:
                    seen.add(id(node))
                    yield fn, node


def graph() -> dict:
    edges = {}
    for name, path in MODULES.items():
        edges[name] = set()
        for _, dotted in imports(name, parse(path)):
            edges[name] |= project_targets(dotted) - {name}
    return edges


def test_no_imports_inside_functions():
    lazy = []
    for name, path in MODULES.items():
        tree = parse(path)
        for fn, node in functions_with_imports(tree):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or "."]
            optional = all(any(m == o or m.startswith(o + ".") for o in OPTIONAL_LAZY) for m in mods)
            if getattr(node, "level", 0) or not optional:
                lazy.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {', '.join(mods)} inside "
                            f"{getattr(fn, 'name', 'a lambda')}()")
    assert not lazy, "imports belong at the top of the module:\n" + "\n".join(lazy)


def test_no_import_cycles():
    edges, state, cycles = graph(), {}, []

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_clis_are_not_imported_and_libraries_do_not_import_cli_helpers():
    bad = []
    for name, deps in graph().items():
        if deps & CLIS:
            bad.append(f"{name} imports the CLI {', '.join(sorted(deps & CLIS))} (import its library instead)")
        if "." in name or name in CLIS | {"cli", "kernels", "scripts"}:
            continue  # the rest are libraries: the engine's top-level modules
        helpers = sorted(d for d in deps if d == "cli" or d.split(".")[0] == "scripts")
        if helpers:
            bad.append(f"the library {name} imports {', '.join(helpers)}")
        if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in parse(MODULES[name]).body):
            bad.append(f"the library {name} defines main(): CLIs live in their own modules")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("folder", ["tests", "scripts"])
def test_no_sys_path_edits(folder):
    found = []
    for path in sorted((ROOT / folder).glob("*.py")):
        for node in ast.walk(parse(path)):
            attr = isinstance(node, ast.Attribute) and node.attr == "path" and \
                isinstance(node.value, ast.Name) and node.value.id == "sys"
            from_sys = isinstance(node, ast.ImportFrom) and node.module == "sys" and \
                any(a.name == "path" for a in node.names)
            if attr or from_sys:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, "sys.path is edited (the repository is a package: pip install -e .):\n" + "\n".join(found)


def test_pyproject_lists_every_module():
    text = (ROOT / "pyproject.toml").read_text()
    listed = set(re.findall(r'"([\w.]+)"', re.search(r"py-modules\s*=\s*\[(.*?)\]", text, re.S).group(1)))
    assert listed == {m for m in MODULES if "." not in m and m not in ("kernels", "scripts")}
    packages = set(re.findall(r'"([\w.]+)"', re.search(r"packages\s*=\s*\[(.*?)\]", text, re.S).group(1)))
    assert packages == {"kernels", "scripts"}
