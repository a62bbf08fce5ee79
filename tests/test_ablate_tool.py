"""tools/ablate.py's table: fidelity per variant, paired gains over a finished experiment."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("ablate", ROOT / "tools" / "ablate.py")
ablate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablate)


def test_table_pairs_gains_by_seed() -> None:
    rows = [{"variant": "a", "seed": 0, "changed": "{}", "fidelity": 0.50},
            {"variant": "a", "seed": 1, "changed": "{}", "fidelity": 0.54},
            {"variant": "b", "seed": 0, "changed": '{"rounds": 2}', "fidelity": 0.56}]
    md = ablate.markdown(rows, {0: 0.52, 1: 0.51}, "x-random")
    lines = md.splitlines()
    assert lines[2] == "| x-random (the run's) | | 2 | 51.50 ± 0.71 |  |"
    # a: gains -2 and +3 pp; b: seed 0 only
    assert lines[3] == "| a | {} | 2 | 52.00 ± 2.83 | 0.50 ± 3.54 |"
    assert lines[4] == '| b | {"rounds": 2} | 1 | 56.00 ± 0.00 | 4.00 ± 0.00 |'


def test_overrides_parse_yaml_values() -> None:
    assert ablate.overrides(["rounds=2", "gamma1=0.5", "dataset={name: digits}"]) == {
        "rounds": 2, "gamma1": 0.5, "dataset": {"name": "digits"}}
