rule report:
    """Results table with the published numbers beside ours, curves, confusion, provenance."""
    input:
        code("report", "stats", "params", "meta", "digest"),
        "src/cola_audio/templates/report.md.j2",
        "src/cola_audio/templates/report.html.j2",
        all_predictions(),
        shard_outputs("npy"),  # the provenance table lists their md5s
        "data/features/index.csv",
        "models/pretrain/curve.csv",
        "models/pretrain/summary.json",
        "models/pretrain/encoder.safetensors",
        "data/features/summary.json",
        "data/features/skipped.csv",
        "data/meta/labels.json",
    output:
        report("reports/report.md", caption="../report/report.rst", category="Results"),
        report(
            "reports/report.html", caption="../report/report.rst", category="Results"
        ),
        "reports/results.json",
        "reports/metrics.json",
        report(
            directory("reports/figures"),
            patterns=["{name}.png"],
            caption="../report/figures.rst",
            category="Figures",
        ),
    log:
        "logs/report.log",
    benchmark:
        "logs/benchmarks/report.tsv"
    threads: 1
    resources:
        mem_mb=node_mem_mb(2000),
    params:
        **report_params(config),
    shell:
        "cola --params params.yaml report > {log} 2>&1"
