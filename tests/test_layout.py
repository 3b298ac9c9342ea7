"""The package's layout rules (docs/architecture.md): imports point down the floors, no import circle, nothing
imports diffscore.commands, Lightning only in lit/ and commands/, no file over 400 lines, no function over 60 lines
of code (its docstring not counted), no public function with more than 12 parameters (options travel as one
dataclass)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "diffscore"
# floor of each top-level part: an import may only reach the same floor or a lower one
FLOORS = {
    "commands": 6,
    "lit": 5,
    "loading": 4,
    "sampling": 3,
    "probes": 3,
    "metrics": 3,
    "networks": 2,
    "data": 2,
    "core": 1,
    "io": 0,
    "outputs": 0,
    "errors": 0,
}
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
MAX_PARAMETERS = 12
ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """The diffscore modules ``path`` imports, at any depth of the file (function-level imports too)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `from diffscore.lit import x` names a module or an attribute of one
                t = t.rpartition(".")[0]
            if t.startswith("diffscore") and t != name:
                found.add(t)
    return found


def floor(name: str) -> int:
    part = name.split(".")[1] if "." in name else ""
    return FLOORS.get(part, 0)


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(path, name, known) for name, path in known.items()}


def test_imports_point_down_and_nothing_imports_commands():
    upward = [
        f"{a} -> {b}"
        for a, targets in graph().items()
        for b in targets
        if floor(b) > floor(a) or (b.startswith("diffscore.commands") and not a.startswith("diffscore.commands"))
    ]
    assert not upward, "imports that point up:\n" + "\n".join(sorted(upward))


def test_no_import_circle():
    g = graph()
    # packages import their own modules to re-export them: the edge package -> own module is not a dependency back
    edges = {a: {b for b in targets if not b.startswith(a + ".")} for a, targets in g.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(nxt_key(node), set())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    def nxt_key(node: str) -> str:
        return node

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_lightning_only_in_lit_and_commands():
    offenders = []
    for name, path in modules().items():
        if name.split(".")[1:2] in (["lit"], ["commands"]):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            mods += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{name}: {m}" for m in mods if m.split(".")[0] in ("lightning", "pytorch_lightning")]
    assert not offenders, offenders


def code_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function from its `def` to its end, less its docstring."""
    total = fn.end_lineno - fn.lineno + 1
    doc = fn.body[0] if fn.body and isinstance(fn.body[0], ast.Expr) else None
    if doc is not None and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str):
        total -= doc.end_lineno - doc.lineno + 1
    return total


def test_files_and_functions_are_short():
    long_files, long_functions = [], []
    for name, path in modules().items():
        text = path.read_text()
        if text.count("\n") > MAX_FILE_LINES:
            long_files.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and code_lines(node) > MAX_FUNCTION_LINES:
                long_functions.append(f"{name}.{node.name}: {code_lines(node)} lines")
    assert not long_files and not long_functions, "\n".join(long_files + long_functions)


def test_the_checker_sees_a_planted_upward_import_and_circle(tmp_path, monkeypatch):
    """The rules above are only as good as the import walk: a planted core -> lit import and a two-file circle
    must both be found."""
    pkg = tmp_path / "diffscore"
    for sub in ("core", "lit"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("def f():\n    from diffscore.lit.b import g\n")
    (pkg / "lit" / "b.py").write_text("from diffscore.core.a import f\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["PACKAGE"]), "PACKAGE", pkg)
    g = graph()
    assert "diffscore.lit.b" in g["diffscore.core.a"] and "diffscore.core.a" in g["diffscore.lit.b"]
    try:
        test_imports_point_down_and_nothing_imports_commands()
    except AssertionError as e:
        assert "diffscore.core.a -> diffscore.lit.b" in str(e)
    else:
        raise AssertionError("the upward import was not found")
    try:
        test_no_import_circle()
    except AssertionError as e:
        assert "diffscore.core.a" in str(e) and "diffscore.lit.b" in str(e)
    else:
        raise AssertionError("the circle was not found")


def parameter_count(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    args = fn.args
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    return len([n for n in names if n not in ("self", "cls")]) + bool(args.vararg) + bool(args.kwarg)


def test_public_functions_take_at_most_twelve_parameters():
    offenders = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not node.name.startswith("_"):
                if parameter_count(node) > MAX_PARAMETERS:
                    offenders.append(f"{name}.{node.name}: {parameter_count(node)} parameters")
    inits = [o for o in offenders if ".__init__" in o]
    assert not [o for o in offenders if o not in inits] and not inits, "\n".join(offenders)


def test_the_architecture_document_lists_every_floor_as_the_checker_does():
    """docs/architecture.md's table of floors is the one FLOORS holds, and names every package."""
    text = ARCHITECTURE.read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) >= 2 and cells[0].isdigit():
            for part in cells[1].replace("`", "").replace("/", "").split(","):
                rows[part.strip().removesuffix(".py")] = int(cells[0])
    assert rows == FLOORS
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= set(rows)
