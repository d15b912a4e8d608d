"""The layout of semantic/: no import cycles, and data flowing one way.

Every import counts, including those inside functions (a lazy import is
still a dependency; it only hides a cycle from Python). Fast: it reads the
source with ``ast`` and imports nothing.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "semantic"


def module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph():
    """{module: {modules of semantic it imports}} over every import statement, wherever it is."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        imported = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    source = f"{base}.{node.module}" if node.module else base
                else:
                    source = node.module
                # "from semantic import cache" imports the module semantic.cache.
                imported.update(f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source for alias in node.names)
        graph[name] = {module for module in imported if module in modules and module != name}
    return graph


def cycles(graph):
    """Every strongly connected group of more than one module (Tarjan), as sorted lists."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def dependencies(graph, module):
    """Everything ``module`` imports, directly or not."""
    seen, todo = set(), [module]
    while todo:
        for target in graph[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def external_imports(module):
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_semantic_has_no_import_cycle():
    graph = import_graph()
    assert "semantic.status" in graph and "semantic.worker" in graph  # the graph was read
    assert cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_hashing_is_a_leaf_and_status_needs_no_celery():
    graph = import_graph()
    assert graph["semantic.hashing"] == set()
    assert graph["semantic.conf"] == set()
    # The one definition of embedding status is usable where no Celery is.
    for module in {"semantic.status", *dependencies(graph, "semantic.status")}:
        assert not {"celery", "kombu"} & external_imports(module), module
    assert "semantic.tasks" not in dependencies(graph, "semantic.status")


def test_data_flows_one_way():
    graph = import_graph()
    # Saving, searching and the worker know nothing of the Celery tasks that call them.
    for module in ("semantic.fields", "semantic.status", "semantic.worker", "semantic.querysets", "semantic.signals", "semantic.wakeups"):
        assert "semantic.tasks" not in dependencies(graph, module), module
    # Modules never import the package facade (semantic/__init__.py) that re-exports them.
    assert not [module for module, targets in graph.items() if "semantic" in targets and module != "semantic"]


def test_only_contrib_imports_rest_framework():
    """The app works without DRF: only semantic.contrib imports it (or drf-spectacular), anywhere in a module.

    (django-filter is different: semantic.views imports it only when a view
    is given filters, and says so when it is missing.)
    """
    optional = {"rest_framework", "drf_spectacular"}
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        module = module_name(path)
        if module == "semantic.contrib" or module.startswith("semantic.contrib."):
            continue
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names.add(node.module.split(".")[0])
        if names & optional:
            offenders[module] = sorted(names & optional)
    assert offenders == {}
    # The check reads what it should: contrib's module does import DRF.
    contrib = (PACKAGE / "contrib" / "rest_framework.py").read_text()
    assert "from rest_framework" in contrib
