# mextract: model-extraction attacks and defences, from one command.
# Full reproduction: snakemake --cores 8 --resources gpu=1
# Offline demo:      snakemake --cores 2 --configfile config/demo.yaml


configfile: f"{workflow.basedir}/config/config.yaml"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/device.smk"
include: "rules/victim.smk"
include: "rules/import.smk"
include: "rules/queries.smk"
include: "rules/attacks.smk"
include: "rules/report.smk"
include: "rules/matrix.smk"


rule all:
    default_target: True
    input:
        rules.make_table.output,
        rules.summarize_run.output,
        MATRIX,
        # every kept file, so that a deleted or failed one is rebuilt
        mc.all_outputs(config),
