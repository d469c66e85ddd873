"""lpjax's modules import one way: each only from its own layer or the layers below (README: Layout of the code)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module belongs to the first layer with a prefix that matches its dotted name.
LAYERS = (
    ("base: errors, config, plan", ("lpjax.errors", "lpjax.config", "lpjax.plan")),
    ("schema and small pure pieces", ("lpjax.schema", "lpjax.quantize", "lpjax.cache", "lpjax.compile",
                                      "lpjax.sampling", "lpjax.kernels")),
    ("model and sharding", ("lpjax.sharding", "lpjax.model")),
    ("weights and sources", ("lpjax.weights", "lpjax.tokenizer", "lpjax.sources", "lpjax.export")),
    ("runtime: compiled programs, decode loop, host-called step", ("lpjax.runtime",)),
    ("engine", ("lpjax.engine",)),
    ("libraries over the model", ("lpjax.quality", "lpjax.training", "lpjax.serving")),
    ("tools (command lines)", ("lpjax.cli", "lpjax.launch", "lpjax.training.cli", "lpjax.generate", "lpjax.eval",
                               "lpjax.sweep", "lpjax.plan.__main__", "lpjax.train", "lpjax.finetune", "lpjax.convert",
                               "lpjax.serve")),
)
TOP = len(LAYERS)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The layer of `module` (the most specific matching prefix wins; `lpjax` itself is the public facade, above
    everything)."""
    if module == "lpjax":
        return TOP
    best, length = None, -1
    for level, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > length:
                best, length = level, len(prefix)
    assert best is not None, f"{module}: in no layer of tests/test_layers.py; add it to one"
    return best


def is_module(dotted: str) -> bool:
    where = ROOT / Path(*dotted.split("."))
    return where.with_suffix(".py").is_file() or where.is_dir()


def lpjax_imports(path: Path) -> set[str]:
    """Every lpjax module `path` imports, at any depth of the file (function-level imports count)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            base = node.module or ""
            # `from lpjax import cli` imports the module lpjax.cli; `from lpjax.model import FULL` lpjax.model
            out.update(f"{base}.{a.name}" if is_module(f"{base}.{a.name}") else base for a in node.names)
    return {m for m in out if m == "lpjax" or m.startswith("lpjax.")}


def graph() -> dict[str, set[str]]:
    return {module_name(p): lpjax_imports(p) for p in sorted((ROOT / "lpjax").rglob("*.py"))}


def test_every_module_imports_only_its_layer_or_below():
    upward = []
    for module, imports in graph().items():
        for target in imports:
            if target != "lpjax" and layer_of(target) > layer_of(module):
                upward.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} "
                              f"({LAYERS[layer_of(target)][0]})")
    assert upward == []


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, trail: list[str]):
        state[m] = 1
        for t in sorted(g.get(m, ())):
            if t not in g or t == "lpjax":
                continue
            if state.get(t) == 1:
                cycles.append(" -> ".join(trail[trail.index(t):] + [t]) if t in trail else f"{m} -> {t}")
            elif t not in state:
                visit(t, [*trail, t])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_the_layer_check_sees_an_upward_import():
    """The check itself: the model importing the engine would be reported."""
    assert layer_of("lpjax.engine") > layer_of("lpjax.model")
    assert layer_of("lpjax.training.cli") == TOP - 1 > layer_of("lpjax.training.loop")
    assert layer_of("lpjax.plan.__main__") > layer_of("lpjax.plan") == 0
