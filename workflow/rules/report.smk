FIGURES = dict(
    caption="../report/figures.rst", category="Figures", patterns=["{name}.png"]
)
RESULTS = dict(caption="../report/report.rst", category="Results")


rule report:
    """Results table with the published numbers beside ours, curves, confusion, provenance."""
    input:
        **stage_input("report"),
    output:
        **stage_output("report", markdown=RESULTS, html=RESULTS, figures=FIGURES),
    log:
        "logs/report.log",
    benchmark:
        "logs/benchmarks/report.tsv"
    threads: 1
    resources:
        mem_mb=node_mem_mb(2000),
    params:
        declared=stage_params("report"),
    shell:
        stage_shell("report")
