"""Code fingerprints follow the real import closure (mextract.fingerprint)."""

from __future__ import annotations

import textwrap
from pathlib import Path

from mextract import fingerprint as fp


def write(pkg: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = pkg / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


BASE = {
    "__init__.py": "",
    "a.py": '''
        """Module a."""
        from pkg.b import (
            scale,
        )


        def helper(x):
            return x + 1


        def run(x):
            return scale(helper(x))
        ''',
    "b.py": '''
        def scale(x):
            return 2 * x
        ''',
    "c.py": '''
        def other(x):
            return x - 1
        ''',
    "attacks/__init__.py": "",
    "attacks/base.py": "from ..c import other\n",
    "attacks/s1.py": "from .base import other\nfrom . import s2\n",
    "attacks/s2.py": "X = 1\n",
}
BASE = {name: textwrap.dedent(text) for name, text in BASE.items()}


def jobs(pkg: Path) -> dict[str, str]:
    """Fingerprints of three 'rules' using a, b and c."""
    return {m: fp.fingerprint(m, package=pkg, name="pkg") for m in ("a", "b", "c")}


def test_multiline_relative_and_strategy_imports(tmp_path):
    pkg = tmp_path / "pkg"
    write(pkg, BASE)
    assert fp.closure(["a"], pkg, "pkg") == ["a", "b"]  # multi-line `from ... import (`
    # relative imports; a module of the attacks package that s1 imports (s2) is in
    # its closure: a change to code a strategy runs reruns it
    assert fp.closure(["attacks/s1"], pkg, "pkg") == ["attacks", "attacks/base", "attacks/s1",
                                                      "attacks/s2", "c"]
    assert fp.closure(["attacks/s2"], pkg, "pkg") == ["attacks/s2"]


def test_moving_a_helper_keeps_the_jobs_up_to_date_that_a_content_change_would(tmp_path):
    pkg = tmp_path / "pkg"
    write(pkg, BASE)
    before = jobs(pkg)

    # a real change of the helper reruns exactly the job that runs it
    write(pkg, {"a.py": BASE["a.py"].replace("x + 1", "x + 2")})
    changed = jobs(pkg)
    assert changed["a"] != before["a"]
    assert changed["b"] == before["b"] and changed["c"] == before["c"]

    # moving the unchanged helper from a to b (a imports it from there): the job that
    # runs it stays up to date, as do the jobs that never import a or b
    write(pkg, {
        "a.py": '''
            from pkg.b import helper, scale


            def run(x):
                return scale(helper(x))
            ''',
        "b.py": BASE["b.py"] + "\n\ndef helper(x):\n    return x + 1\n",
    })
    moved = jobs(pkg)
    assert moved["a"] == before["a"]
    assert moved["c"] == before["c"]
    # b's own jobs gain a definition, so they rerun (conservative, never stale)
    assert moved["b"] != before["b"]


def test_comments_and_docstrings_do_not_rerun(tmp_path):
    pkg = tmp_path / "pkg"
    write(pkg, BASE)
    before = jobs(pkg)
    text = BASE["a.py"].replace('"""Module a."""', '"""Module a, documented."""  # note')
    text = text.replace("def helper(x):", 'def helper(x):\n    """Add one."""')
    write(pkg, {"a.py": text})
    assert jobs(pkg) == before


def test_library_closures():
    experiment = fp.closure(["experiment"])
    for module in ("api", "train", "attacks/base", "attacks/registry", "defences", "watermark"):
        assert module in experiment
    assert "attacks/kd" not in experiment  # strategies are loaded by name, not imported
    # shared helper modules are in the closures of the strategies that run them (a
    # changed selection loop reruns MARICH and active learning, not KD)
    assert "attacks/selection" in fp.closure(["experiment", "attacks/marich"])
    assert "attacks/selection" in fp.closure(["experiment", "attacks/active_learning"])
    assert "attacks/random_queries" in fp.closure(["experiment", "attacks/knockoff"])
    kd = fp.closure(["experiment", "attacks/kd"])
    assert [m for m in kd if m.startswith("attacks/")] == [
        "attacks/base", "attacks/kd", "attacks/registry"]
    assert "config" not in experiment  # config logic never enters a job's fingerprint
    assert fp.fingerprint("experiment", "attacks/kd") != fp.fingerprint("experiment",
                                                                        "attacks/basic")


def test_repeated_fingerprints_see_every_edit_and_are_fast(tmp_path):
    """Parsed modules are cached by their text (a dry run fingerprints every job's
    closure, the same files again and again), never by path: an edit between two calls
    in one process changes the fingerprint, and an import added later enters the
    closure."""
    import time

    pkg = tmp_path / "pkg"
    write(pkg, BASE)
    before = jobs(pkg)
    write(pkg, {"b.py": BASE["b.py"].replace("2 * x", "3 * x")})
    after = jobs(pkg)
    assert after["b"] != before["b"] and after["a"] != before["a"]
    assert after["c"] == before["c"]
    write(pkg, {"c.py": "from pkg.b import scale\n" + BASE["c.py"]})
    assert "b" in fp.closure(["c"], package=pkg, name="pkg")
    # the library's own closures, as a dry run of the demo asks for them (54 calls)
    t0 = time.perf_counter()
    for _ in range(54):
        fp.fingerprint("experiment", "attacks/marich")
    assert time.perf_counter() - t0 < 10  # ~0.1 s cached; ~15 s when every call parsed
