"""Rules about the code's shape that no behaviour test would catch."""

import ast
from pathlib import Path

EXO = Path(__file__).resolve().parent.parent / "exo"
# Calls whose `with` body must not contain a generator's yield (PEP 789): a task group or a
# cancel scope left open while the generator is suspended belongs to whoever resumes it.
SCOPES = {"create_task_group", "CancelScope", "fail_after", "move_on_after"}
CONTEXT_MANAGERS = {"asynccontextmanager", "contextmanager"}  # `with` guarantees their exit


def called_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Call):
        node = node.func
    return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", None)


def opened(node: ast.expr) -> set[str]:
    """Names a `with` item may open: `(a if c else b)(...)` opens a or b."""
    function = node.func if isinstance(node, ast.Call) else node
    if isinstance(function, ast.IfExp):
        return opened(function.body) | opened(function.orelse)
    return {called_name(function)} - {None}


def scope_owners(trees: list[ast.AST]) -> set[str]:
    """SCOPES plus every context manager of the project that opens one, directly or through
    another such manager (a generator suspended inside `engine.generate(...)` holds the
    pipeline's task group just as much as one inside `create_task_group()`)."""
    managers = [node for tree in trees for node in ast.walk(tree)
                if isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef)
                and any(called_name(d) in CONTEXT_MANAGERS for d in node.decorator_list)]
    owners = set(SCOPES)
    while True:
        grown = owners | {m.name for m in managers for node in ast.walk(m) if isinstance(node, ast.With | ast.AsyncWith)
                          and any(opened(item.context_expr) & owners for item in node.items)}
        if grown == owners:
            return owners
        owners = grown


def yields_in_scopes(tree: ast.AST, scopes: set[str] = SCOPES) -> list[str]:
    """'function:line' for every yield inside a scope-opening `with` of a generator."""
    found: list[str] = []

    def visit(node: ast.AST, function: ast.AST | None, depth: int) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            decorators = getattr(node, "decorator_list", [])
            exempt = any(called_name(d) in CONTEXT_MANAGERS for d in decorators)
            function, depth = (None if exempt else node), 0
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            depth += sum(bool(opened(item.context_expr) & scopes) for item in node.items)
        elif isinstance(node, (ast.Yield, ast.YieldFrom)) and depth and function is not None:
            found.append(f"{function.name}:{node.lineno}")
        for child in ast.iter_child_nodes(node):
            visit(child, function, depth)

    visit(tree, None, 0)
    return found


def test_no_generator_yields_inside_a_task_group_or_cancel_scope():
    trees = {path: ast.parse(path.read_text()) for path in sorted(EXO.rglob("*.py"))}
    scopes = scope_owners(list(trees.values()))
    assert {"generate", "pipelined_blocks", "_generate_here"} <= scopes  # the ones that own task groups
    offenders = [f"{path.relative_to(EXO.parent)}:{where}" for path, tree in trees.items()
                 for where in yields_in_scopes(tree, scopes)]
    assert offenders == []


def test_the_checker_sees_a_yield_inside_a_task_group():
    source = ("async def leaky():\n    async with anyio.create_task_group() as group:\n        yield 1\n"
              "@asynccontextmanager\nasync def owned():\n    with anyio.fail_after(1):\n        yield 2\n")
    assert yields_in_scopes(ast.parse(source)) == ["leaky:3"]


def test_the_checker_follows_context_managers_that_open_task_groups():
    source = ("@asynccontextmanager\nasync def blocks():\n    async with anyio.create_task_group():\n        yield 1\n"
              "@asynccontextmanager\nasync def generate():\n    async with blocks() as b:\n        yield b\n"
              "async def leaky():\n    async with engine.generate() as b:\n        yield 3\n")
    tree = ast.parse(source)
    assert scope_owners([tree]) >= {"blocks", "generate"}
    assert yields_in_scopes(tree, scope_owners([tree])) == ["leaky:11"]


def test_inference_imports_nothing_from_speculative():
    for path in sorted((EXO / "inference").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(name.startswith("exo.speculative") for name in names), path
