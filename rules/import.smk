# Bring your own model (docs/serve.md): victims with a `source` are imported from the
# user's file instead of trained, and URL APIs (`apis.<name>.url`, a served API) get
# their fidelity reference by asking the remote API once on the test set.

import re

BYO_VICTIMS = mc.byo_victims(config)


# a victim with a `source` is imported, never trained (the constraint below limits
# import_victim to those victims; every other one is trained)
ruleorder: import_victim > train_victim


rule import_victim:
    input:
        data=rules.prepare_data.output.data,
        source=lambda wc: config["victims"][wc.victim]["source"]["path"],
        device_ok=DEVICE_OK,
    output:
        model=f"{RESULTS}/victims/{{victim}}/model.pt",
        test_pred=f"{RESULTS}/victims/{{victim}}/test_predictions.pt",
        metrics=f"{RESULTS}/victims/{{victim}}/metrics.json",
        history=f"{RESULTS}/victims/{{victim}}/history.csv",
    log:
        f"{RESULTS}/logs/import_victim/{{victim}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/import_victim/{{victim}}.tsv"
    wildcard_constraints:
        victim="|".join(re.escape(v) for v in BYO_VICTIMS) or "(?!)",
    conda:
        ENV
    threads: config["compute"]["threads"]
    resources:
        gpu=GPU,
    params:
        victim=lambda wc: config["victims"][wc.victim],
        compute=config["compute"],
        code=fingerprint("byo", "victim"),
    script:
        "../workflow/scripts/import_victim.py"


# Fidelity against a served API: its answers on the test set (soft answers: their
# arg-max), asked once with the API's key and counted by the server as evaluation
# queries (results/remote/<api>/evaluation.json), apart from every attack's queries.
rule remote_test_predictions:
    input:
        data=rules.prepare_data.output.data,
    output:
        test_pred=f"{RESULTS}/remote/{{api}}/test_predictions.pt",
        metrics=f"{RESULTS}/remote/{{api}}/evaluation.json",
    log:
        f"{RESULTS}/logs/remote_test_predictions/{{api}}.log",
    conda:
        ENV
    params:
        api=lambda wc: mc.api_settings(config, wc.api),
        compute=config["compute"],
        code=fingerprint("experiment"),
    script:
        "../workflow/scripts/remote_predictions.py"
