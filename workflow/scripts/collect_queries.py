"""Answer a query set once through the victim API; cache the answers and the defender's
DAWN watermark log of them (empty for an API without a DAWN layer)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))

from mextract.runtime import quick_imports

with quick_imports():  # no garbage collection while the imports load
    from mextract.data import load_dataset
    from mextract.experiment import load_defence_models, load_victim, make_api
    from mextract.io import load_artifact, save_artifact
    from mextract.queries import collect
    from mextract.runtime import eprint, logged, setup

with logged(snakemake.log[0], f"apis.{snakemake.wildcards.api}"):
    compute = setup(snakemake.params.compute, snakemake.threads)
    data = load_dataset(snakemake.input.data)
    pool = data["x_train"][load_artifact(snakemake.input.split)["pool"]]
    victim = None  # a served API (`url`) has no victim here
    if "victim" in dict(snakemake.input.items()):
        victim = load_victim(snakemake.input.victim, snakemake.params.victim,
                             len(data["classes"]))
    models = load_defence_models(list(snakemake.input.defence_models),
                                 snakemake.params.api["defences"], len(data["classes"]))
    api = make_api(victim, snakemake.params.api, compute, models)
    cache = collect(api, pool, snakemake.wildcards.qset)
    eprint(f"{snakemake.wildcards.qset}: {cache['count']} queries answered by {cache['api']}")
    log = api.watermark_log()
    if api.watermarked:
        eprint(f"watermark: {len(log['labels'])} distinct answers logged")
    save_artifact(cache, snakemake.output.cache)
    save_artifact(log, snakemake.output.watermark)
