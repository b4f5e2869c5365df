"""The layout rules of the code base, checked: small modules, no import
cycles, the tunnel package free of HTTP, imports inside functions only with
a reason, and a supervisor that loads none of grpc, zmq or aiohttp."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gateway"
MAX_LINES = 400
GENERATED = {"gateway/tunnel/tunnel_pb2.py"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if str(rel) in GENERATED:
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(node: ast.Import | ast.ImportFrom, module: str, modules: dict[str, Path]) -> set[str]:
    """The gateway modules an import statement loads."""
    names: set[str] = set()
    if isinstance(node, ast.Import):
        candidates = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            pkg = module.split(".")[: len(module.split(".")) - node.level + (1 if _is_package(module, modules) else 0)]
            base = ".".join(pkg + ([base] if base else []))
        candidates = [base] + [f"{base}.{a.name}" for a in node.names]
    for name in candidates:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name:
            names.add(name)
    return names


def _is_package(module: str, modules: dict[str, Path]) -> bool:
    return modules[module].name == "__init__.py"


def _runtime_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Module-level imports that run at import time (not under TYPE_CHECKING, not in functions)."""
    out = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                out.append(node)
            elif isinstance(node, ast.If) and not _is_type_checking(node):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif isinstance(node, ast.ClassDef):
                visit(node.body)

    visit(tree.body)
    return out


def _function_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    out = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out += [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return sorted(set(out), key=lambda n: n.lineno)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in _runtime_imports(ast.parse(path.read_text())):
            deps |= _imported(node, name, modules)
        # A package's __init__ runs before its modules: importing gateway.x.y imports gateway.x.
        graph[name] = {d for d in deps if d != name and not name.startswith(d + ".")}
    return graph


def test_no_module_over_the_limit():
    long = {str(p.relative_to(ROOT)): n for p in _modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_no_import_cycle():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_checks_see_imports_and_cycles():
    """Guards for the test above: the graph holds real edges, and a cycle is found."""
    graph = _graph()
    assert "gateway.workers.routing" in graph["gateway.workers.tunnel_endpoint"] or \
        "gateway.tunnel.stream" in graph["gateway.workers.routing"]
    assert "gateway.tunnel.frames" in graph["gateway.tunnel.stream"]
    # TYPE_CHECKING imports are not edges: routing only names GatewayConfig for types.
    assert "gateway.config" not in graph["gateway.workers.routing"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_tunnel_package_has_no_http():
    """gateway/tunnel/ is frames, the stream and its transports: no aiohttp,
    no httptools, nothing of the HTTP, worker or client packages."""
    modules = _modules()
    bad = []
    for name, path in modules.items():
        if not name.startswith("gateway.tunnel"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                targets = [node.module or ""]
            else:
                continue
            for target in targets:
                top = target.split(".")[0]
                if top in ("aiohttp", "httptools", "multidict", "yarl") or target.startswith(
                        ("gateway.http", "gateway.workers", "gateway.client", "gateway.router")):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {target}")
    assert not bad, bad


def test_imports_inside_functions_say_why():
    """An import inside a function avoids a real cost or an ordering problem;
    a comment right above its block (or on its line) says which."""
    missing = []
    for path in _modules().values():
        lines = path.read_text().splitlines()
        for node in _function_imports(ast.parse("\n".join(lines))):
            i = node.lineno - 1
            if "#" in lines[i]:
                continue
            j = i - 1
            # Walk up over the block of imports, blank lines and comments this import sits in.
            while j >= 0 and (lines[j].strip() == "" or lines[j].lstrip().startswith(("import ", "from ", "#"))):
                if lines[j].lstrip().startswith("#"):
                    break
                j -= 1
            if j < 0 or not lines[j].lstrip().startswith("#"):
                missing.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not missing, "imports inside functions without a comment saying why: " + "; ".join(missing)


def test_cli_and_supervisor_load_no_grpc_zmq_or_aiohttp():
    """The supervisor forks workers: it must not have loaded grpc (fork safety), and
    neither zmq nor aiohttp, which only workers need. The client's CLI likewise
    loads grpc only after choosing its I/O engine."""
    code = (
        "import sys\n"
        "import gateway.cli, gateway.supervisor, gateway.client.main\n"
        "print(','.join(sorted(m for m in ('grpc', 'zmq', 'aiohttp', 'httptools') if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"loaded at import: {out.stdout.strip()}"
