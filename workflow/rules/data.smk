rule download:
    """FMA archives (verified) or the embedded dataset, in the release's layout."""
    input:
        code("download", "synthetic", "fma", "folder", "digest"),
    output:
        directory("data/raw"),
    log:
        "logs/download.log",
    benchmark:
        "logs/benchmarks/download.tsv"
    threads: node_threads(JOB_THREADS)
    resources:
        mem_mb=node_mem_mb(2000),
    params:
        **data_params(config),  # only what changes the audio: never `download` (transport)
        folder_files=folder_listing(),  # data.source: folder: the files themselves
    shell:
        "cola --params params.yaml download > {log} 2>&1"


rule prepare:
    """Metadata JSON: official split, stable label ids, leakage-free pretraining set."""
    input:
        code("prepare", "fma", "folder", "meta"),
        "workflow/schemas/meta.schema.yaml",
        "data/raw",
    output:
        "data/meta/labels.json",
        "data/meta/finetune.json",
        "data/meta/pretrain.json",
    log:
        "logs/prepare.log",
    benchmark:
        "logs/benchmarks/prepare.tsv"
    threads: 1
    resources:
        mem_mb=node_mem_mb(2000),
    params:
        **pick(config, "data.finetune_subset", "data.pretrain_subset"),
        prepare=config["prepare"],
    shell:
        "cola --params params.yaml prepare > {log} 2>&1"
