"""The pipeline at FMA-large scale, simulated on this machine (not a test).

For each size N: a fresh clone whose embedded dataset has N clips (7.5 % of them in fma_small, as
the release has 8,000 of 106,574), clips of 3-3.5 s, the genre task only and a few training
steps, built cold with `snakemake --cores all`. Then the orchestration overheads on that checkout:
a no-op Snakemake start (with the DVC sync), `dvc status`, `cola dvc-commit` of the whole run (every
stage left to commit, as after a full run), `snakemake -n` and `dvc status` after one audio file
changed (Snakemake does not look inside data/raw, so its figure is -n's cost at that size); and
`snakemake -n` of a folder source (`data.source: folder`) holding the same N clips, before and
after one file changed (Snakemake fingerprints every file of it).

Prints each stage's seconds per clip and peak memory (Snakemake's benchmark files: the job's
process tree, summed (PSS), sampled each second for 30 s, then every 30 s), the loader
construction of both training stages, each overhead, and per stage the ratio of its per-clip
cost at the largest N to the smallest (a stage that grows faster than linearly shows > 1).
Training stages run a fixed number of steps: their seconds are shown, not divided by N.

Usage: python benchmarks/scale.py [--sizes 1000 10000 30000] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
SMALL_SHARE = 8000 / 106_574  # fma_small's share of fma_large
DATA_STAGES = (
    "download",
    "prepare",
    "featurize",
    "featurize_gather",
    "task_data",
    "embed_pretrained",
    "embed_random",
    "probe",
    "report",
)
# A few pretraining steps, one fine-tuning epoch of one run, one probe: the data stages are what
# is measured.
TINY_TRAINING = {
    "pretrain": {"max_steps": 2, "warmup_steps": 1, "precise_bn_batches": 1, "batch_size": 16},
    "finetune": {
        "runs": {
            "finetune": {"scratch": ["scratch-finetune"], "pretrained": []},
            "linear": {"scratch": [], "pretrained": []},
        },
        "seeds": [0],
        "max_epochs": 1,
        "val_every_n_epochs": 1,
        "precise_bn_batches": 1,
    },
    "probe": {"label_fractions": [1.0], "seeds": [0], "C_grid": [1.0], "precise_bn_batches": 1},
}


def scaled_params(n: int) -> dict[str, Any]:
    """The default params.yaml with N clips, short ones, the genre task and tiny training."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    per_genre = max(10, round(n * SMALL_SHARE / 8))
    params["data"]["synthetic"].update(
        small_tracks_per_genre=per_genre,
        large_only_tracks=n - 8 * per_genre,
        clip_seconds=[3.0, 3.5],
    )
    for section, values in TINY_TRAINING.items():
        params[section].update(values)
    params["tasks"] = {"genre": params["tasks"]["genre"]}
    params["report"]["comparisons"] = []
    return params


def clone(dest: Path, params: dict[str, Any]) -> Path:
    subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def timed(cmd: str, cwd: Path) -> float:
    """Wall seconds of a shell command that must succeed."""
    start = time.perf_counter()
    done = subprocess.run(cmd, shell=True, cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        logs = sorted((cwd / "logs").rglob("*.log"), key=lambda p: p.stat().st_mtime)
        last = logs[-1].read_text()[-3000:] if logs else ""
        sys.exit(f"{cmd} failed in {cwd}:\n{done.stderr[-3000:]}\n{last}")
    return time.perf_counter() - start


def per_rule(repo: Path) -> dict[str, dict[str, float]]:
    """Seconds (summed over a rule's jobs) and peak PSS in MB (largest job) per rule."""
    rules: dict[str, dict[str, float]] = {}
    for tsv in sorted((repo / "logs" / "benchmarks").glob("*.tsv")):
        row = pd.read_csv(tsv, sep="\t", na_values=["NA", "-"]).iloc[0]
        name = tsv.stem
        for prefix in (
            "featurize_gather",
            "task_data",
            "embed_pretrained",
            "embed_random",
            "probe",
            "finetune",
            "featurize",
        ):
            if name.startswith(prefix):
                name = prefix
                break
        entry = rules.setdefault(name, {"s": 0.0, "pss_mb": 0.0})
        entry["s"] += float(row["s"])
        pss = row.get("max_pss")  # NA: the job ended before Snakemake's first sample
        entry["pss_mb"] = max(entry["pss_mb"], 0.0 if pd.isna(pss) else float(pss))
    return rules


LOADERS = """
import json, resource, sys, time
from pathlib import Path
from cola_audio import data, params
cfg = params.load(Path("params.yaml"))
out = {}
for name, module in (("pretrain", data.PretrainData), ("finetune", data.GenreData)):
    start = time.perf_counter()
    kwargs = dict(features=Path("data/features"), meta_dir=Path("data/meta"),
                  crop_frames=cfg[name]["crop_frames"], batch_size=cfg[name]["batch_size"],
                  num_workers=0, seed=0)
    if name == "finetune":
        kwargs["eval_batch_size"] = cfg[name]["eval_batch_size"]
    dm = module(**kwargs)
    dm.setup("fit")
    next(iter(dm.train_dataloader()))
    out[name] = time.perf_counter() - start
out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def loader_construction(repo: Path) -> dict[str, float]:
    """Seconds to build each training stage's data module and draw its first batch, and the
    process's peak RSS (torch included)."""
    done = subprocess.run(
        [sys.executable, "-c", LOADERS], cwd=repo, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.splitlines()[-1])


def change_one_clip(repo: Path) -> None:
    """Give one pretraining clip other bytes (another clip's), as a re-download would."""
    clips = sorted((repo / "data" / "raw" / "fma_large").rglob("*.mp3"))
    clips[0].write_bytes(clips[1].read_bytes())


def full_commit_seconds(repo: Path) -> float:
    """`cola dvc-commit` with every stage to commit: the lock of a run from other params (the
    clone's committed one), as a full run leaves it. The built lock is put back afterwards."""
    built = (repo / "dvc.lock").read_bytes()
    subprocess.run(["git", "checkout", "-q", "dvc.lock"], cwd=repo, check=True)
    seconds = timed("COLA_DVC_SYNCED=0 cola dvc-commit", repo)
    (repo / "dvc.lock").write_bytes(built)
    return seconds


def folder_source(tmp: Path, built: Path, n: int) -> dict[str, float]:
    """`snakemake -n` with `data.source: folder` over the built clips (hard links in one folder
    per genre), cold, then after one file changed."""
    params = yaml.safe_load((built / "params.yaml").read_text())
    repo = clone(tmp / f"folder-{n}", params)
    audio = repo / "data" / "my-audio"
    for i, clip in enumerate(sorted((built / "data" / "raw" / "fma_large").rglob("*.mp3"))):
        target = audio / f"class{i % 8}" / clip.name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(clip, target)
    params["data"]["source"] = "folder"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    first = timed("snakemake -n --cores all", repo)
    victim = sorted(audio.rglob("*.mp3"))[0]
    victim.unlink()
    victim.write_bytes(b"\xff\xfb" + bytes(4096))
    after = timed("snakemake -n --cores all", repo)
    shutil.rmtree(repo)
    return {"snakemake -n, folder source": first, "snakemake -n, folder, 1 file changed": after}


def one_size(tmp: Path, n: int) -> dict[str, Any]:
    repo = clone(tmp / f"synthetic-{n}", scaled_params(n))
    result: dict[str, Any] = {"n": n, "cold_s": timed("snakemake --cores all", repo)}
    result["rules"] = per_rule(repo)
    result["loaders"] = loader_construction(repo)
    overheads = {
        "no-op snakemake": timed("snakemake --cores all", repo),
        "dvc status": timed("dvc status", repo),
    }
    overheads["cola dvc-commit, full run"] = full_commit_seconds(repo)
    change_one_clip(repo)
    # Snakemake does not look inside its directory output data/raw: this is -n's cost at this size
    overheads["snakemake -n, 1 clip changed"] = timed("snakemake -n --cores all", repo)
    overheads["dvc status, 1 clip changed"] = timed("dvc status", repo)
    overheads.update(folder_source(tmp, repo, n))
    result["overheads"] = overheads
    result["files_in_raw"] = sum(1 for p in (repo / "data" / "raw").rglob("*") if p.is_file())
    shutil.rmtree(repo)
    return result


def show_size(r: dict[str, Any]) -> None:
    print(
        f"\nN = {r['n']:,} clips ({r['files_in_raw']:,} files in data/raw), "
        f"cold {r['cold_s']:.0f} s"
    )
    for rule, m in sorted(r["rules"].items()):
        per_clip = "" if rule not in DATA_STAGES else f"{1000 * m['s'] / r['n']:8.2f} ms/clip"
        print(f"  {rule:<18} {m['s']:8.1f} s {per_clip:>16}   peak {m['pss_mb']:7.0f} MB")
    lo = r["loaders"]
    print(
        f"  loaders: pretrain {lo['pretrain']:.2f} s, finetune {lo['finetune']:.2f} s, "
        f"peak {lo['peak_mb']:.0f} MB"
    )
    for name, s in r["overheads"].items():
        print(f"  {name:<38} {s:7.2f} s")
    sys.stdout.flush()


def show_growth(results: list[dict[str, Any]]) -> None:
    """Per-clip cost at the largest N over the smallest (as asked) and over the next largest: a
    stage's fixed start-up (imports, a few seconds) inflates the smallest N's per-clip cost, so
    the second ratio is the one that shows growth faster than linear."""
    *_, before, large = results
    small = results[0]
    print(
        f"\nper-clip cost at N = {large['n']:,} over N = {small['n']:,} and over "
        f"N = {before['n']:,} (1.0 = linear):"
    )
    for rule in DATA_STAGES:
        if all(rule in r["rules"] for r in (small, before, large)):
            cost = {id(r): r["rules"][rule]["s"] / r["n"] for r in (small, before, large)}
            print(
                f"  {rule:<18} {cost[id(large)] / cost[id(small)]:5.2f} "
                f"{cost[id(large)] / cost[id(before)]:5.2f}"
            )
    print("overheads at N = 100k, extrapolated linearly from the two largest sizes:")
    for name in large["overheads"]:
        y0, y1 = before["overheads"][name], large["overheads"][name]
        slope = (y1 - y0) / (large["n"] - before["n"])
        print(f"  {name:<38} {y1 + slope * (100_000 - large['n']):7.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 30_000])
    parser.add_argument("--quick", action="store_true", help="the smallest sizes only (1k, 3k)")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    args = parser.parse_args()
    sizes = [1000, 3000] if args.quick else sorted(args.sizes)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            results.append(one_size(Path(tmp), n))
            show_size(results[-1])
            if args.json:
                args.json.write_text(json.dumps(results, indent=2))
    if len(results) > 1:
        show_growth(results)


if __name__ == "__main__":
    main()
