"""The layers, as the imports say (every import statement, also inside functions): kernels/ is only
tensors; cluster/ is the substrate (data plane, client APIs, config, placement, the engine loop) and
never imports the roles in actors/; the command line and benchmarks (actors/cli) sit on top of the
roles; no module imports itself back through others."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "cluster", "actors")
GENERATED = "cluster/rpc/"


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if not rel.startswith(GENERATED) or rel.endswith("generate.py"):
                out[rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")] = path
    return out


def imports(path: Path, name: str) -> set[str]:
    """Every module `path` imports, absolute, wherever the import statement is."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


GRAPH = {name: imports(path, name) for name, path in modules().items()}


def offenders(prefix: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    bad = {}
    for name, deps in GRAPH.items():
        if name == prefix or name.startswith(prefix + "."):
            hits = sorted(d for d in deps if any(d == f or d.startswith(f + ".") for f in forbidden))
            if hits:
                bad[name] = hits
    return bad


def test_kernels_is_only_tensors():
    assert offenders("kernels", ("ray", "grpc", "grpc_health", "yaml", "cluster", "actors")) == {}


def test_the_substrate_never_imports_the_roles():
    assert offenders("cluster", ("actors",)) == {}


def test_the_roles_never_import_the_command_line():
    """actors/cli (the `moeray` command and the benchmark harnesses) sits on top of the roles, not under them."""
    roles = {name: deps for name, deps in GRAPH.items()
             if name.startswith("actors.") and not name.startswith("actors.cli")}
    assert {name: sorted(d for d in deps if d.startswith("actors.cli")) for name, deps in roles.items()
            if any(d.startswith("actors.cli") for d in deps)} == {}


def test_no_import_cycles():
    internal = {name: {d for d in deps if d in GRAPH and d != name} for name, deps in GRAPH.items()}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(internal[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for name in sorted(internal):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_the_graph_is_read():  # the checks above would pass on an empty graph
    assert {"kernels.model", "cluster.dataplane.transport", "actors.router"} <= GRAPH.keys()
    assert "kernels.moe" in GRAPH["kernels.model"] and "ray" in GRAPH["actors.router"]
