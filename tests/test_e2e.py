"""The whole pipeline, small, in a temporary copy of the repository, through both orchestrators.

Order matters: each test continues from the state the previous one left (a user's session).
"""

from __future__ import annotations

import contextlib
import json
import re
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from dag import dvc_stages, snakemake_stages, with_downstream

from conftest import PIPELINE_RULES, sh, tiny_checkout

pytestmark = pytest.mark.slow


def stages_run(dvc_output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", dvc_output))


def finetune_stages(params: dict) -> set[str]:
    """finetune_<init>@<run>-<seed> for every run × seed in params."""
    ft = params["finetune"]
    return {
        f"finetune_{init}@{run}-{seed}"
        for init, runs in ft["runs"].items()
        for run in runs
        for seed in ft["seeds"]
    }


RUNS = ("scratch-finetune", "random-linear", "pretrained-finetune", "pretrained-linear")


def write_params(repo: Path, params: dict) -> None:
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@contextlib.contextmanager
def edited_params(repo: Path, edit: Callable[[dict], None]) -> Iterator[dict]:
    """params.yaml with `edit` applied for the block (yielded, to edit further with
    `write_params`), put back byte for byte afterwards: later tests continue from the build."""
    original = (repo / "params.yaml").read_text()
    params = yaml.safe_load(original)
    edit(params)
    write_params(repo, params)
    try:
        yield params
    finally:
        (repo / "params.yaml").write_text(original)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("e2e")
    repo, remote = tiny_checkout(base / "repo"), base / "remote"
    sh(f"dvc remote add -f -d local {remote}", repo)
    return {"base": base, "repo": repo, "remote": remote}


def test_snakemake_builds_the_report_with_every_row(work):
    repo = work["repo"]
    sh("snakemake --cores 2", repo)
    report = (repo / "reports" / "report.md").read_text()
    for row in ("random guess", *RUNS):
        assert f"| {row} |" in report or f"| {row} " in report, row
    assert "embedded synthetic dataset" in report
    assert "pretrained-finetune** vs **scratch-finetune" in report or (
        "**pretrained-finetune** is" in report
    )
    html = (repo / "reports" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 6  # results, curves, four confusion matrices
    results = json.loads((repo / "reports" / "results.json").read_text())
    assert len(results["rows"]) == 5 and len(results["comparisons"]) == 2
    seeds = yaml.safe_load((repo / "params.yaml").read_text())["finetune"]["seeds"]
    assert all(r["seeds"] == len(seeds) for r in results["rows"][1:])
    for run in RUNS:
        for seed in seeds:
            assert (repo / "logs" / "finetune" / run / f"seed-{seed}.log").is_file()
            assert not (
                repo / "models" / "finetune" / run / f"seed-{seed}" / "checkpoints"
            ).exists()


def test_dvc_status_is_clean_after_snakemake(work):
    repo = work["repo"]
    assert json.loads(sh("dvc status --json", repo).stdout or "{}") == {}
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    # The report's artifact table says "md5 (as in dvc.lock)": it must be.
    locked = {o["path"]: o["md5"] for s in lock["stages"].values() for o in s.get("outs", [])}
    reported = json.loads((repo / "reports" / "results.json").read_text())["provenance"]["hashes"]
    assert reported and all(locked[path] == md5 for path, md5 in reported.items())


def test_second_snakemake_run_has_nothing_to_do(work):
    out = sh("snakemake --cores 2", work["repo"])
    assert "Nothing to be done" in out.stdout + out.stderr


def test_snakemake_report_bundles_the_results(work):
    """`snakemake --report`: the captions in workflow/report/ and the outputs marked report()."""
    repo = work["repo"]
    sh("snakemake --report workflow-report.zip", repo)
    with zipfile.ZipFile(repo / "workflow-report.zip") as bundle:
        names = bundle.namelist()
    assert any(n.endswith("report.html") for n in names), names
    assert any(n.endswith("curve.csv") for n in names), names
    (repo / "workflow-report.zip").unlink()


def test_speed_and_transport_knobs_rerun_nothing_in_either_tool(work):
    """Featurization workers, retries, timeouts, the mirror and (in synthetic mode) the real
    archives' SHA1s change how fast or from where, never what is computed: nothing may rerun."""
    repo = work["repo"]

    def speed_and_transport(params):
        params["features"]["workers"] = 2
        params["download"].update(retries=1, timeout_s=5, backoff_s=0.5, base_url="http://mirror/")
        params["data"]["fma"]["sha1"]["fma_large.zip"] = "0" * 40

    with edited_params(repo, speed_and_transport) as params:
        dry = sh("snakemake --cores 2 -n", repo)
        assert "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout[-3000:]
        assert json.loads(sh("dvc status --json", repo).stdout or "{}") == {}
        params["data"]["synthetic"]["seed"] += 1  # the control: this one changes the audio
        write_params(repo, params)
        assert "download" in json.loads(sh("dvc status --json", repo).stdout)
        assert "rule download:" in sh("snakemake --cores 2 -n", repo).stdout


def test_a_new_seed_schedules_only_its_own_jobs_in_both_tools(work):
    repo = work["repo"]

    def add_a_seed(params):
        params["finetune"]["seeds"].append(max(params["finetune"]["seeds"]) + 1)

    with edited_params(repo, add_a_seed) as params:
        new = params["finetune"]["seeds"][-1]
        dry = sh("snakemake --cores 2 -n", repo).stdout
        scheduled = set(re.findall(r"wildcards: run=([a-z-]+), seed=(\d+)", dry))
        assert scheduled == {(run, str(new)) for run in RUNS}
        assert "rule pretrain:" not in dry and "rule report:" in dry
        changed = set(json.loads(sh("dvc status --json", repo).stdout))
        assert changed == {s for s in finetune_stages(params) if s.endswith(f"-{new}")} | {"report"}


def test_a_shard_count_and_a_new_run_in_one_edit_schedule_the_same_stages_in_both_tools(work):
    """Issue 10: one params.yaml edit (three shards instead of four, one run more) and, on the
    built pipeline, `snakemake -n` schedules exactly the stages `dvc status` finds changed plus
    everything downstream of them (DVC lists only the stages whose own inputs changed)."""
    repo = work["repo"]

    def three_shards_and_a_run(params):
        params["features"]["shards"] = [0, 1, 2]
        params["finetune"]["runs"]["pretrained"]["pretrained-linear-2"] = "linear"

    with edited_params(repo, three_shards_and_a_run):
        changed = set(json.loads(sh("dvc status --json", repo).stdout))
        assert {
            "featurize_shard@0",
            "featurize_shard@2",
            "finetune_pretrained@pretrained-linear-2-0",
        } <= changed
        scheduled = set(snakemake_stages(repo, forceall=False))
        assert scheduled == with_downstream(changed, dvc_stages(repo))
        assert "pretrain" in scheduled and "featurize_shard@3" not in scheduled


def test_a_partial_snakemake_run_never_vouches_for_stages_it_did_not_rebuild(work):
    """Edit a fine-tuning param, rebuild only `prepare`: dvc.lock must not record the old
    fine-tuning outputs against the new value."""
    repo = work["repo"]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["finetune"]["dropout"] = 0.25
    write_params(repo, params)
    sh("snakemake --cores 2 --until prepare --forcerun prepare", repo)
    changed = set(json.loads(sh("dvc status --json", repo).stdout))
    assert finetune_stages(params) <= changed
    assert "prepare" not in changed  # what did run is recorded


def test_finetune_param_edit_reruns_only_finetuning_and_report(work):
    repo = work["repo"]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    metrics = repo / "models" / "finetune" / "scratch-finetune" / "seed-0" / "metrics.json"
    before = json.loads(metrics.read_text())
    params["finetune"]["lr"] = 5e-4
    write_params(repo, params)
    out = sh("dvc repro", repo).stdout
    assert stages_run(out) == {*finetune_stages(params), "report"}
    after = json.loads(metrics.read_text())  # retrained from scratch, not a resumed old run
    assert after["run_identity"] != before["run_identity"]
    assert after["steps"] == before["steps"]


def test_after_dvc_repro_snakemake_has_nothing_to_do(work):
    """Issue 8.3: Snakemake's next start adopts what `dvc repro` just verified (sync.py)."""
    dry = sh("snakemake --cores 2 -n", work["repo"])
    assert "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout[-3000:]
    assert "Snakemake adopts what DVC verified" in dry.stderr


def test_a_shard_lost_after_a_kill_is_rebuilt_or_restored_identically(work):
    """A killed featurize job (then `--unlock`) can leave a shard missing while everything after
    it looks up to date. Snakemake alone must rebuild it, not say "Nothing to be done"; with
    DVC beside it, the next start checks it out of DVC's cache instead of recomputing it."""
    repo = work["repo"]
    shard = repo / "data" / "features" / "shards" / "1.npy"
    before = shard.read_bytes()
    shard.unlink()
    assert "featurize_shard@1" in json.loads(sh("dvc status --json", repo).stdout)
    alone = "COLA_DVC_SYNC=off snakemake --cores 2"
    dry = sh(f"{alone} -n", repo).stdout
    assert re.search(r"rule featurize_shard:.*?wildcards: shard=1", dry, re.S), dry[-3000:]
    sh(f"{alone} --until featurize_shard", repo)
    assert shard.read_bytes() == before

    shard.unlink()
    run = sh("snakemake --cores 2", repo)
    assert "restored from DVC's cache, nothing retrained: featurize_shard@1" in run.stderr
    assert "Nothing to be done" in run.stdout + run.stderr, run.stderr[-3000:]
    assert shard.read_bytes() == before
    assert json.loads(sh("dvc status --json", repo).stdout or "{}") == {}


def test_featurize_param_edit_reruns_featurize_and_everything_after(work):
    repo = work["repo"]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["features"]["fmin_hz"] = 80.0
    write_params(repo, params)
    out = sh("dvc repro", repo).stdout
    ran = stages_run(out)
    assert "download" not in ran and "prepare" not in ran
    assert ran == {
        *(f"featurize_shard@{k}" for k in params["features"]["shards"]),
        "featurize_gather",
        "pretrain",
        *finetune_stages(params),
        "report",
    }
    # New shards, so pretraining trains every step again (it once "resumed" a finished run).
    summary = json.loads((repo / "models" / "pretrain" / "summary.json").read_text())
    assert summary["resumed_from"] is None
    assert summary["steps"] == params["pretrain"]["max_steps"]


def test_push_clone_pull_retrains_nothing(work):
    repo, base = work["repo"], work["base"]
    sh("git add -A && git commit -qm 'results' && dvc push -q", repo)
    clone = base / "clone"
    sh(f"git clone -q {repo} {clone}", base)
    sh("dvc pull -q", clone)
    assert json.loads(sh("dvc status --json", clone).stdout or "{}") == {}
    encoder = clone / "models" / "pretrain" / "encoder.safetensors"
    digest = encoder.read_bytes()
    dry = sh("snakemake --cores 2 -n", clone)  # adopts what DVC verified, by itself
    assert "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout[-3000:]
    sh("snakemake --cores 2", clone)
    assert encoder.read_bytes() == digest
    assert json.loads(sh("dvc status --json", clone).stdout or "{}") == {}
    assert "Stage 'pretrain' didn't change" in sh("dvc repro", clone).stdout
    # A later parameter edit is still noticed by Snakemake after adoption.
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["finetune"]["dropout"] = 0.3
    write_params(clone, params)
    dry = sh("snakemake --cores 2 -n", clone).stdout
    assert "finetune_scratch" in dry and "rule pretrain:" not in dry


def test_going_back_to_earlier_params_restores_instead_of_retraining_in_both_tools(work):
    """Issue 8.3: DVC's cache holds the outputs of every params.yaml either tool has built;
    going back to one checks them out (DVC's run cache in `dvc repro`, `cola sync-dvc` at
    Snakemake's start) instead of training again: Snakemake restores a `dvc repro` build, DVC
    a Snakemake build."""
    repo = work["repo"]
    metrics = sorted((repo / "models" / "finetune").glob("*/seed-*/metrics.json"))
    committed = {p: p.read_bytes() for p in metrics}  # built by `dvc repro` (featurize edit)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["finetune"]["lr"] = 2e-3
    write_params(repo, params)
    built = sh("snakemake --cores 2", repo)
    assert "rule finetune_scratch:" in built.stdout + built.stderr  # this one trains
    edited = {p: p.read_bytes() for p in metrics}
    assert edited != committed

    # `dvc exp show` stays readable: the report's gains, the edited param, the runs' folder.
    shown = sh("dvc exp show --only-changed --csv", repo).stdout.splitlines()[0].split(",")
    fixed = {"Experiment", "rev", "typ", "Created", "parent", "State", "Executor"}
    gains = set(json.loads((repo / "reports" / "metrics.json").read_text()))
    assert set(shown) - fixed <= gains | {"finetune.lr", "models/finetune"}, shown
    table = sh("COLUMNS=120 dvc exp show --only-changed --no-pager", repo).stdout
    assert max(len(line) for line in table.splitlines()) <= 120

    sh("git checkout params.yaml", repo)  # DVC restores the committed run...
    assert stages_run(sh("dvc repro", repo).stdout) == set()
    assert {p: p.read_bytes() for p in metrics} == committed
    write_params(repo, params)
    assert stages_run(sh("dvc repro", repo).stdout) == set()  # ...and the Snakemake one
    assert {p: p.read_bytes() for p in metrics} == edited

    sh("git checkout params.yaml", repo)  # Snakemake restores what `dvc repro` built
    run = sh("snakemake --cores 2", repo)
    assert "restored from DVC's cache" in run.stderr
    assert "Nothing to be done" in run.stdout + run.stderr, run.stderr[-3000:]
    assert {p: p.read_bytes() for p in metrics} == committed
    assert json.loads(sh("dvc status --json", repo).stdout or "{}") == {}
    dry = sh("snakemake --cores 2 -n", repo)
    assert "Nothing to be done" in dry.stdout + dry.stderr


UPSTREAM_EDITS = {  # param → (stages declaring it, every rule downstream of them)
    ("data", "synthetic", "seed"): ({"download"}, set(PIPELINE_RULES)),
    ("features", "n_mels"): ({"featurize_shard", "featurize_gather"}, set(PIPELINE_RULES[2:])),
}


def test_after_a_pull_an_upstream_edit_schedules_exactly_what_follows_it(work):
    """In the pulled and adopted clone, an upstream edit is seen by both tools: DVC flags the
    stages that declare the param (the rest follow by hashes when they run), Snakemake schedules
    exactly everything downstream; the run then ends with both tools clean."""
    clone = work["base"] / "clone"
    sh("git checkout params.yaml", clone)
    original = (clone / "params.yaml").read_text()
    for (section, *path), (declaring, downstream) in UPSTREAM_EDITS.items():
        params = yaml.safe_load(original)
        target = params[section]
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] += 7 if path[-1] == "seed" else -16
        write_params(clone, params)
        dry = sh("snakemake --cores 2 -n", clone).stdout
        scheduled = set(re.findall(r"^rule (\w+):", dry, re.M)) - {"all"}
        assert scheduled == downstream, dry[-2000:]
        changed = {s.split("@")[0] for s in json.loads(sh("dvc status --json", clone).stdout)}
        assert changed == declaring
    sh("snakemake --cores 2", clone)  # the n_mels edit, run: 48 mel bands end to end
    assert json.loads(sh("dvc status --json", clone).stdout or "{}") == {}
    dry = sh("snakemake --cores 2 -n", clone)
    assert "Nothing to be done" in dry.stdout + dry.stderr
    summary = json.loads((clone / "data" / "features" / "summary.json").read_text())
    assert summary["frontend"]["n_mels"] == 48
