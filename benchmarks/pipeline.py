"""Orchestration overheads, in one run on this machine (not a test).

Prints: the default pipeline's cold wall time (`snakemake --cores all` in a fresh copy of the
repository), a no-op `snakemake` and `dvc status` right after, and `snakemake -n` / `dvc status` on
FMA-large-sized metadata (106,574 tracks; a dry run needs no audio).
Usage: python benchmarks/pipeline.py [--skip-cold]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

from cola_audio import fsutil, prepare, synthetic

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: str, cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, shell=True, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - start


def job_seconds(repo: Path) -> dict[str, float]:
    """Wall seconds each rule's jobs took (Snakemake's benchmark files), summed per rule."""
    import pandas as pd

    totals: dict[str, float] = {}
    for tsv in sorted((repo / "logs" / "benchmarks").glob("*.tsv")):
        rule = tsv.stem.split("_seed-")[0].rstrip("_0123456789")
        for known in ("finetune_", "embed_pretrained", "embed_random", "task_data", "probe"):
            if rule.startswith(known):
                rule = known.rstrip("_")
        totals[rule] = totals.get(rule, 0.0) + float(pd.read_csv(tsv, sep="\t")["s"].iloc[0])
    return totals


def fresh_copy(dest: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True)
    return dest


def fma_large_metadata(repo: Path) -> None:
    """tracks.csv and data/meta/*.json for 106,574 tracks (8,000 small), as prepare writes them."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    cfg = dict(
        params["data"]["synthetic"],
        small_tracks_per_genre=1000,
        large_only_tracks=106_574 - 8000,
        faulty_files=False,
    )
    tracks, _ = synthetic.plan_dataset(cfg)
    meta = repo / "data" / "raw" / "fma_metadata"
    meta.mkdir(parents=True, exist_ok=True)
    tracks.to_csv(meta / "tracks.csv")
    synthetic.genres_table(tracks).to_csv(meta / "genres.csv", index=False)
    prepare.run(params, out_dir=repo / "data" / "meta", raw_dir=meta.parent)
    fsutil.write_json(repo / "data" / "raw" / "SOURCE.json", {"source": "benchmark"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-cold", action="store_true", help="skip the full default run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.skip_cold:
            repo = fresh_copy(tmp / "cold")
            cold = timed("snakemake --cores all", repo)
            noop_smk = timed("snakemake --cores all", repo)
            noop_dvc = timed("dvc status", repo)
            print(f"default pipeline, cold, 2 cores : {cold:8.1f} s (target ≤ 720 s)")
            for rule, seconds in job_seconds(repo).items():
                print(f"  {rule:<28}: {seconds:8.1f} s (sum over its jobs)")
            print(f"no-op snakemake                 : {noop_smk:8.1f} s (target ≤ 15 s)")
            print(f"dvc status after it             : {noop_dvc:8.1f} s (target ≤ 5 s)")
            report = (repo / "reports" / "report.md").read_text().splitlines()
            print("\n".join(line for line in report if line.startswith("|")))
            shutil.rmtree(repo)
        repo = fresh_copy(tmp / "large")
        start = time.perf_counter()
        fma_large_metadata(repo)
        print(f"FMA-large metadata generated in   {time.perf_counter() - start:8.1f} s")
        dry = timed("snakemake -n --cores all", repo)
        status = timed("dvc status", repo)
        print(f"snakemake -n, 106,574 tracks    : {dry:8.1f} s (target ≤ 10 s)")
        print(f"dvc status, 106,574 tracks      : {status:8.1f} s (target ≤ 10 s)")


if __name__ == "__main__":
    main()
