rule check_device:
    output:
        ok=temp(f"{RESULTS}/checks/device.ok"),
    log:
        f"{RESULTS}/logs/check_device.log",
    conda:
        ENV
    resources:
        gpu=GPU,
    params:
        device=config["compute"]["device"],
    script:
        "../workflow/scripts/check_device.py"
