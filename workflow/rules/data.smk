rule download:
    """FMA archives (verified) or the embedded dataset, in the release's layout."""
    input:
        **stage_input("download"),
    output:
        **stage_output("download"),
    log:
        "logs/download.log",
    benchmark:
        "logs/benchmarks/download.tsv"
    threads: node_threads(JOB_THREADS)
    resources:
        mem_mb=node_mem_mb(2000),
    params:
        declared=stage_params("download"),
        folder_files=folder_listing(),  # data.source: folder: the files themselves
    shell:
        stage_shell("download")


rule prepare:
    """Metadata JSON: official split, stable label ids, leakage-free pretraining set."""
    input:
        **stage_input("prepare"),
    output:
        **stage_output("prepare"),
    log:
        "logs/prepare.log",
    benchmark:
        "logs/benchmarks/prepare.tsv"
    threads: 1
    resources:
        mem_mb=node_mem_mb(2000),
    params:
        declared=stage_params("prepare"),
    shell:
        stage_shell("prepare")
