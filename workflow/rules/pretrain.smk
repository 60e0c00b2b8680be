rule pretrain:
    """COLA contrastive pretraining; on a GPU when the executor grants one."""
    input:
        **stage_input("pretrain"),
    output:
        **stage_output(
            "pretrain",
            curve=dict(caption="../report/pretrain_curve.rst", category="Pretraining"),
        ),
    log:
        "logs/pretrain.log",
    benchmark:
        "logs/benchmarks/pretrain.tsv"
    threads: node_threads(config["pretrain"]["threads"])
    resources:
        gpu=1,  # the plugin's form: sbatch --gpus=1; 0 on a site without GPUs
        mem_mb=node_mem_mb(16000),
        runtime=720,
    params:
        declared=stage_params("pretrain"),
    shell:
        stage_shell("pretrain")
