"""The command layer is the only door to redis-py: checked on the package's source."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import aioredispatterns

PACKAGE = Path(aioredispatterns.__file__).parent
# The command layer (and the test harness, which starts servers with redis-py's own
# clients): nothing else may import redis-py at run time.
DOORS = {
    "_client",
    "_cluster",
    "_codec",
    "_commands",
    "_connection",
    "_pipeline",
    "_testing_cluster",
    "_translate",
    "_transport",
    "testing",
}

# The benchmark scenarios measure raw redis-py side by side with the library: their
# baseline rows use redis-py directly, by design.
BASELINES = ("_bench.scenarios.", "_bench.redis_py")


def _runtime_imports(body: list[ast.stmt]) -> Iterator[tuple[int, str]]:
    for node in body:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _runtime_imports(node.orelse)
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.stmt):
                yield from _runtime_imports([child])
            elif hasattr(child, "body") and isinstance(child.body, list):
                yield from _runtime_imports(child.body)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def test_only_the_command_layer_imports_redis_py() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = path.relative_to(PACKAGE).with_suffix("").as_posix().replace("/", ".")
        if module in DOORS or module.startswith(BASELINES):
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for line, name in _runtime_imports(tree.body):
            if name == "redis" or name.startswith("redis."):
                offenders.append(f"{path.name}:{line} imports {name}")
    assert not offenders, "\n".join(offenders)


def test_the_walker_sees_nested_imports(tmp_path: Path) -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import redis\n"
        "def f():\n    from redis import exceptions\n"
    )
    names = [name for _, name in _runtime_imports(ast.parse(source).body)]
    assert names == ["typing", "redis"]
