"""The library's import graph has no cycles and no upward imports.

Every import counts, including the ones inside functions (a lazy import hides a cycle,
it does not remove it). Layers, lowest first; a module may import its own layer and
the layers below it:

0. foundations: io, compute, defaults, fingerprint, augment, models
1. data, metrics, the training loop
2. the victim API and its defence layers, watermarks, the query-log store, PRADA
   detection
3. query caches, attacker pools
4. attack strategies (attacks/*: the registry, the shared base and selection loop)
5. what runs stages: victim training, one experiment, the benchmark
6. what reads a whole run: config expansion, tables, plots (the defence matrix's too),
   job set-up
"""

from __future__ import annotations

from mextract import fingerprint as fp

LAYERS = [
    {"__init__", "io", "compute", "defaults", "fingerprint", "augment", "models", "timings"},
    {"data", "metrics", "train"},
    {"watermark", "defences", "defence_specs", "defence_models", "api", "querylog",
     "detection", "remote"},
    {"queries", "pools"},
    {"attacks"},  # the package and every module in it
    {"victim", "experiment", "bench", "byo", "serve"},
    {"config", "report", "plots", "runtime", "cli", "matrix"},
]


def layer(module: str) -> int:
    top = "attacks" if module.startswith("attacks") else module
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"module {module!r} has no layer: add it to LAYERS in this test")


def graph() -> dict[str, set[str]]:
    modules = [fp._name_of(p, fp.PACKAGE) for p in fp.PACKAGE.rglob("*.py")]
    return {m: fp.imports(fp.module_path(m)) - {m} for m in modules}


def test_every_module_has_a_layer_and_imports_nothing_above_it():
    upward = [f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
              for m, deps in graph().items() for d in deps if layer(d) > layer(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_workflow_side_modules_stay_torch_free():
    """The workflow imports these while it builds the DAG (no torch there)."""
    light = ("config", "report", "fingerprint", "defaults", "timings", "attacks/registry",
             "defence_specs")
    for module in light:
        closure = fp.closure([module])
        heavy = [m for m in closure if m not in (*light, "attacks", "__init__")]
        assert not heavy, f"{module} pulls in {heavy}"
