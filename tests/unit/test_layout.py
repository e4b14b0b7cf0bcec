"""The import rules of docs/DESIGN.md ("Layout"), checked on the source: no cycle,
fleetlib imports no component, the tree library stays free of protobuf and gRPC,
and the dominator's layers import one way (cli -> server -> deploy -> herd)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fleetlib.testing.daemons import PROJECT

PACKAGES = ("fleetlib", "imageserver", "subd", "mdb", "dominator")
# Each layer of the dominator may import the layers after it, never those before.
DOMINATOR_LAYERS = ("dominator.cli", "dominator.server", "dominator.deploy", "dominator.herd")


def modules() -> dict[str, Path]:
    """Every module of the installed packages (generated protobuf modules left out)."""
    found = {}
    for package in PACKAGES:
        for path in (PROJECT / package).rglob("*.py"):
            if "_pb2" not in path.name:
                name = ".".join(path.relative_to(PROJECT).with_suffix("").parts)
                found[name.removesuffix(".__init__")] = path
    return found


def imports() -> dict[str, set[str]]:
    """module -> the project modules it imports, at any depth (imports inside
    functions included: they are cycles all the same)."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_bytes())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for target in names:
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def external_imports(package: str) -> set[str]:
    """Top-level names of everything the modules of `package` import."""
    names: set[str] = set()
    for name, path in modules().items():
        if name == package or name.startswith(package + "."):
            for node in ast.walk(ast.parse(path.read_bytes())):
                if isinstance(node, ast.Import):
                    names.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names.add(node.module)
    return names


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(start: str) -> None:
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return found


def test_no_import_cycle() -> None:
    assert cycles(imports()) == []


def test_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def offending(source_prefix: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{name} imports {target}" for name, targets in imports().items()
                  if name == source_prefix or name.startswith(source_prefix + ".")
                  for target in targets
                  if any(target == f or target.startswith(f + ".") for f in forbidden))


def test_fleetlib_imports_no_component() -> None:
    assert offending("fleetlib", ("imageserver", "subd", "mdb", "dominator")) == []


def test_tree_library_is_free_of_protobuf_and_grpc() -> None:
    assert offending("fleetlib.fstree", ("fleetlib.wire", "fleetlib.rpc")) == []
    outside = {name.split(".")[0] for name in external_imports("fleetlib.fstree")}
    assert not outside & {"grpc", "google"}


@pytest.mark.parametrize(("package", "forbidden"), [
    ("subd", ("dominator", "imageserver", "mdb")),
    ("imageserver", ("dominator", "subd", "mdb")),
    ("mdb", ("dominator", "subd", "imageserver")),
])
def test_components_import_only_the_shared_package(package: str,
                                                   forbidden: tuple[str, ...]) -> None:
    assert offending(package, forbidden) == []


@pytest.mark.parametrize("layer", range(1, len(DOMINATOR_LAYERS)))
def test_dominator_layers_import_one_way(layer: int) -> None:
    assert offending(DOMINATOR_LAYERS[layer], DOMINATOR_LAYERS[:layer]) == []


def test_no_generic_top_level_package() -> None:
    """proto-plus installs a top-level `proto`; ours must never shadow or collide."""
    for name in ("proto", "rpc", "fstree"):
        assert not list((PROJECT / name).glob("*.py")), f"{name}/ holds Python modules"
