"""Before any GPU job of a run with an explicit CUDA device: the device works in a job
(rule check_device). Fails, naming compute.device, where it does not."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))

from mextract.runtime import quick_imports

with quick_imports():  # no garbage collection while the imports load
    from mextract.io import write_text
    from mextract.runtime import check_device, logged

with logged(snakemake.log[0], "compute.device"):
    line = check_device(snakemake.params.device)
    print(line, file=sys.stderr)
    write_text(line + "\n", snakemake.output.ok)
