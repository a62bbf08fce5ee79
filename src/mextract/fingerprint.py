"""Code fingerprints of library modules, so the workflow reruns exactly what changed.

Snakemake does not track imported library code, so every rule passes the fingerprint
of the library modules its job runs as a param: a changed fingerprint reruns the job.
:func:`closure` follows the real imports (parsed with :mod:`ast`: ``import x``,
``from x import y``, multi-line and relative imports, imports inside functions) from
the modules a rule names; :func:`fingerprint` hashes what the code *does*: each
top-level definition of the closure as a normalised syntax tree (comments, docstrings
and import statements left out), keyed by its name, not by the module it sits in.
So a comment or docstring edit reruns nothing, and moving a helper between two modules
of a job's closure keeps that job up to date, exactly as an unchanged helper would;
a changed helper reruns every job whose closure holds it.

Strategies are loaded by name (``registry.load``, not an import), so a strategy
module enters a closure only when the rule names it, or when the named code really
imports it or a helper module: MARICH's closure holds ``attacks/selection``, the
selection loop it runs, and KnockoffNets' holds ``attacks/random_queries``, whose
training step it shares. One strategy's change reruns exactly the experiments whose
code it is.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from collections.abc import Iterable
from pathlib import Path

#: the library's package directory (src/mextract)
PACKAGE = Path(__file__).resolve().parent
NAME = "mextract"


def module_path(module: str, package: Path = PACKAGE) -> Path | None:
    """File of a library module given as ``a/b`` or ``a.b`` (relative to the package)."""
    rel = module.replace(".", "/")
    for path in (package / f"{rel}.py", package / rel / "__init__.py"):
        if path.exists():
            return path
    return None


def _name_of(path: Path, package: Path) -> str:
    rel = path.relative_to(package).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return "/".join(parts) or "__init__"


@functools.lru_cache(maxsize=1024)
def _imported_names(text: str, filename: str) -> tuple[tuple[int, str, tuple[str, ...]], ...]:
    """The import statements of a source text as (level, module, names), parsed once
    per distinct text: the workflow fingerprints every job's closure, and parsing the
    same files again for each job took most of a dry run's 20 s."""
    out = []
    for node in ast.walk(ast.parse(text, filename=filename)):
        if isinstance(node, ast.Import):
            out.extend((0, alias.name, ()) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            out.append((node.level, node.module or "", tuple(a.name for a in node.names)))
    return tuple(out)


def imports(path: Path, package: Path = PACKAGE, name: str = NAME) -> set[str]:
    """Library modules (``a/b`` names) that a file imports, anywhere in it."""
    here = _name_of(path, package).split("/")
    if path.name != "__init__.py":
        here = here[:-1]
    found: set[str] = set()

    def add(dotted: str) -> None:
        parts = dotted.split(".")
        if parts[0] != name:
            return
        rel = "/".join(parts[1:])
        if rel and module_path(rel, package):
            found.add(_name_of(module_path(rel, package), package))  # type: ignore[arg-type]

    for level, module, names in _imported_names(path.read_text(), str(path)):
        if not names and not level and module:  # `import x.y`
            add(module)
            continue
        if level:  # relative import
            base = here[:len(here) - level + 1] if level > 1 else here
            dotted = ".".join([name, *base, *([module] if module else [])])
        else:
            dotted = module
        add(dotted)
        for alias in names:  # `from mextract import train` imports a module
            add(f"{dotted}.{alias}")
    return found


def closure(modules: Iterable[str], package: Path = PACKAGE, name: str = NAME) -> list[str]:
    """The named modules and every library module they import, transitively."""
    named = {m.replace(".", "/") for m in modules}
    todo, seen = list(named), set()
    while todo:
        mod = todo.pop()
        path = module_path(mod, package)
        if mod in seen or path is None:
            continue
        seen.add(mod)
        todo.extend(imports(path, package, name) - seen)
    return sorted(seen)


def _strip_docstring(body: list[ast.stmt]) -> list[ast.stmt]:
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        return body[1:]
    return body


def definitions(path: Path) -> dict[str, str]:
    """Top-level statements of a module as normalised source, keyed by what they define
    (functions, classes, assigned names; other statements by position), without
    docstrings, comments or imports."""
    return dict(_definitions(path.read_text(), str(path), _name_of(path, path.parent)))


@functools.lru_cache(maxsize=1024)
def _definitions(text: str, filename: str, stem: str) -> tuple[tuple[str, str], ...]:
    """:func:`definitions` of one source text, computed once per distinct text."""
    tree = ast.parse(text, filename=filename)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            node.body = _strip_docstring(node.body) or [ast.Pass()]
    out: dict[str, str] = {}
    for i, node in enumerate(_strip_docstring(tree.body)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            key = node.name
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            key = ",".join(ast.unparse(t) for t in targets)
        else:
            key = f"#{i}:{stem}"
        out[key] = ast.unparse(node)
    return tuple(out.items())


def fingerprint(*modules: str, package: Path = PACKAGE, name: str = NAME) -> str:
    """sha256 (16 hex digits) over the definitions of the modules' :func:`closure`."""
    defs: dict[str, str] = {}
    for mod in closure(modules, package, name):
        path = module_path(mod, package)
        assert path is not None
        for key, source in definitions(path).items():
            # the same name in two modules of one closure: keep both, by module
            defs[key if key not in defs else f"{mod}:{key}"] = source
    h = hashlib.sha256()
    for key in sorted(defs):
        h.update(key.encode() + b"\0" + defs[key].encode() + b"\0")
    return h.hexdigest()[:16]
