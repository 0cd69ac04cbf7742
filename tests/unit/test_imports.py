"""Imports point one way (docs/design.md §2), read from the source with `ast` (every import, at module level or
inside a function): no cycle between modules, the core never imports the evaluation harness or the command line,
and `checkpoints_conv` sits on the bottom of lt_jax only."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Layers, bottom first: a module may import its own layer's modules (without a cycle) and those of layers below.
LAYERS = [
    ("bottom", ["lt_jax.errors", "lt_jax.files", "lt_jax.progress", "lt_jax.config", "lt_jax.params",
                "lt_jax.batching", "lt_jax.distributed", "lt_jax.records", "lt_jax.needles"]),
    ("checkpoints", ["checkpoints_conv", "checkpoints_conv.*"]),
    ("core", ["lt_jax.attention", "lt_jax.plan", "lt_jax.cache", "lt_jax.lazy", "lt_jax.model", "lt_jax.inference",
              "lt_jax.serving", "lt_jax.sharding", "lt_jax.calibration", "lt_jax.probes", "lt_jax.train",
              "lt_jax.train.*", "lt_jax.assets", "lt_jax.scoring", "lt_jax.api", "lt_jax"]),
    # what runs over the core: the evaluation harness, the server and lm-eval model, TPU ahead-of-time compilation
    ("harness", ["lt_jax.eval", "lt_jax.eval.*", "lt_jax.server", "lt_jax.lm_eval_model", "lt_jax.aot"]),
    ("cli", ["lt_jax.cli", "lt_jax.cli.*"]),
]
# checkpoints_conv imports only these of lt_jax; only these of lt_jax import checkpoints_conv
CHECKPOINTS_MAY_IMPORT = {"lt_jax.config", "lt_jax.params", "lt_jax.errors", "lt_jax.files"}
MAY_IMPORT_CHECKPOINTS = {"lt_jax.api", "lt_jax.assets", "lt_jax.train.run", "lt_jax.cli.*"}


def _modules() -> dict[str, Path]:
    out = {}
    for package in ("lt_jax", "checkpoints_conv"):
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _matches(name: str, patterns) -> bool:
    return any(name == p or (p.endswith(".*") and name.startswith(p[:-1])) for p in patterns)


def _layer(name: str) -> int:
    found = [i for i, (_, names) in enumerate(LAYERS) if _matches(name, names)]
    assert len(found) == 1, f"{name} must sit in exactly one layer of LAYERS (tests/unit/test_imports.py)"
    return found[0]


def imports(name: str) -> set[str]:
    """The project modules `name` imports (`from lt_jax import x` counts as lt_jax.x when x is a module)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports(name) for name in MODULES}


def test_every_module_has_a_layer():
    for name in MODULES:
        _layer(name)


def test_no_import_goes_up_a_layer():
    up = [(a, b) for a, targets in GRAPH.items() for b in targets
          if _layer(b) > _layer(a) and not (a == "lt_jax" and b == "lt_jax.api")]
    assert up == [], up


def test_no_cycle():
    """Package __init__ files re-export their modules, so the edge from a module to its own package is left out."""
    state, stack = {}, []

    def visit(name):
        state[name] = "open"
        stack.append(name)
        for target in sorted(GRAPH[name]):
            if name.startswith(target + "."):
                continue  # a module importing from its package's __init__ (lt_jax.cli.eval -> lt_jax.cli)
            if state.get(target) == "open":
                raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(target):] + [target])}")
            if target not in state:
                visit(target)
        stack.pop()
        state[name] = "done"

    for name in MODULES:
        if name not in state:
            visit(name)


def test_core_never_imports_the_harness_or_the_cli():
    bad = [(a, b) for a, targets in GRAPH.items() for b in targets
           if _layer(a) <= _layer("lt_jax.api") and (_matches(b, ["lt_jax.eval", "lt_jax.eval.*", "lt_jax.cli",
                                                                  "lt_jax.cli.*"]))]
    assert bad == []


def test_checkpoints_conv_sits_on_the_bottom_of_lt_jax_only():
    for name, targets in GRAPH.items():
        ours = {t for t in targets if t.startswith("lt_jax")}
        if name.startswith("checkpoints_conv"):
            assert ours <= CHECKPOINTS_MAY_IMPORT, (name, ours - CHECKPOINTS_MAY_IMPORT)
        elif any(t.startswith("checkpoints_conv") for t in targets):
            assert _matches(name, MAY_IMPORT_CHECKPOINTS), name


def test_the_graph_is_read():
    """The reader sees imports at module level and inside functions (a test that cannot fail proves nothing)."""
    assert "lt_jax.errors" in GRAPH["lt_jax.files"]
    assert "checkpoints_conv" in GRAPH["lt_jax.api"]  # imported inside `load`
    assert "lt_jax.eval.bench" in GRAPH["lt_jax.cli.bench"]
