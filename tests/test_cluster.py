"""Past one machine, for real: the SLURM profile on a one-node SLURM cluster, and an ssh:// DVC
remote on a loopback sshd (marker `cluster`).

Both need root, Debian's packages (tests/cluster/*-up.sh install and start them, *-down.sh stop
them) and COLA_CLUSTER_TESTS=1, since they start system daemons; without any of these they skip,
saying why. The scripts refuse to touch a SLURM or MariaDB they did not set up. Order matters:
the pipeline SLURM built is then pushed over SSH, then broken on purpose.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from cola_audio.params import finetune_runs
from cola_audio.stages import STAGES
from conftest import PIPELINE_RULES, REPO, sh, tiny_checkout

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
SCRIPTS = REPO / "tests" / "cluster"
# Only how often Snakemake looks at the queue (the profile's defaults suit a busy real cluster).
FAST_POLLING = "--slurm-init-seconds-before-status-checks 2 --seconds-between-status-checks 2"
PROFILE = "snakemake --workflow-profile workflow/profiles/slurm " + FAST_POLLING
REMOTE_RULES = set(PIPELINE_RULES)  # every rule but `all` runs as a SLURM job


def service(script: str, *args: str) -> str:
    """Run an *-up.sh script; skip (saying why) where it cannot or should not run here."""
    if os.environ.get("COLA_CLUSTER_TESTS") != "1":
        pytest.skip(
            "starts SLURM and sshd daemons as root: set COLA_CLUSTER_TESTS=1 (.ci/run does)"
        )
    if os.geteuid() != 0:
        pytest.skip("needs root to run SLURM and sshd daemons (CI runs as root)")
    done = subprocess.run(
        ["bash", str(SCRIPTS / script), *args], capture_output=True, text=True, timeout=600
    )
    if done.returncode == 77:
        pytest.skip(done.stderr.strip())
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def slurm_jobs(since: str) -> list[tuple[str, str]]:
    """(rule, state) of every SLURM job started since `since`, from the accounting database."""
    out = sh(f"sacct -X -n -P -S {since} -o Comment%200,State", Path.cwd()).stdout
    jobs = []
    for line in out.splitlines():
        comment, _, state = line.partition("|")
        if match := re.match(r"rule_([a-z_]+?)(_wildcards_.*)?$", comment):
            jobs.append((match.group(1), state.split()[0]))
    return jobs


def site_profile(repo: Path) -> None:
    """The edits README asks of a user: partition and account; no GPUs on this site."""
    path = repo / "workflow" / "profiles" / "slurm" / "config.yaml"
    profile = yaml.safe_load(path.read_text())
    profile["default-resources"].update(slurm_partition="debug", slurm_account="cola")
    for rule in profile["set-resources"].values():
        rule.update(slurm_partition="debug", gpu=0)
    path.write_text(yaml.safe_dump(profile, sort_keys=False))


@pytest.fixture(scope="module")
def slurm():
    service("slurm-up.sh")
    yield
    subprocess.run(["bash", str(SCRIPTS / "slurm-down.sh")], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def built(slurm, tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("cluster")
    repo = tiny_checkout(base / "repo")
    site_profile(repo)
    since = time.strftime("%Y-%m-%dT%H:%M:%S")
    run = sh(PROFILE, repo, check=False, timeout=1200)
    return {"base": base, "repo": repo, "since": since, "run": run}


def test_the_slurm_profile_runs_every_rule_as_a_slurm_job(built):
    repo, run = built["repo"], built["run"]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (repo / "reports" / "report.md").is_file()
    jobs = slurm_jobs(built["since"])
    assert {rule for rule, _ in jobs} == REMOTE_RULES
    assert all(state == "COMPLETED" for _, state in jobs), jobs
    params = yaml.safe_load((repo / "params.yaml").read_text())
    runs = len(finetune_runs(params["finetune"]))
    shards = len(params["features"]["shards"])
    per_task = 4  # task_data, embed_pretrained, embed_random, probe
    expected = (
        5 + shards + runs * len(params["finetune"]["seeds"]) + per_task * len(params["tasks"])
    )
    assert len(jobs) == expected == sum(len(s.items(params)) for s in STAGES.values()), jobs
    assert json.loads(sh("dvc status --json", repo).stdout or "{}") == {}


def test_an_ssh_remote_shares_the_cluster_build_with_a_fresh_clone(built):
    base, repo = built["base"], built["repo"]
    keys = base / "ssh"
    port = service("sshd-up.sh", str(keys))
    try:
        store = base / "ssh-store"
        sh(f"dvc remote add -d -f cluster ssh://root@127.0.0.1:{port}{store}", repo)
        sh(f"dvc remote modify cluster keyfile {keys / 'client_key'}", repo)
        sh("git add -A && git commit -qm 'built on SLURM' && dvc push -q", repo)
        assert any(store.rglob("*")), "nothing arrived on the SSH remote"
        clone = base / "clone"
        sh(f"git clone -q {repo} {clone}", base)
        sh("dvc pull -q", clone)
        encoder = Path("models") / "pretrain" / "encoder.safetensors"
        assert (clone / encoder).read_bytes() == (repo / encoder).read_bytes()
        run = sh("snakemake --cores 2", clone)  # adopts what DVC verified, by itself
        assert "Nothing to be done" in run.stdout + run.stderr, run.stdout[-3000:]
        assert json.loads(sh("dvc status --json", clone).stdout or "{}") == {}
    finally:
        subprocess.run(["bash", str(SCRIPTS / "sshd-down.sh"), str(keys)], capture_output=True)


def test_a_failing_cluster_job_is_reported_failed_not_waited_on(built):
    """A damaged predictions file makes the report job fail on the cluster: Snakemake must end
    with an error naming the rule (after the profile's one retry), not wait for ever."""
    repo = built["repo"]
    (repo / "models" / "finetune" / "random-linear" / "seed-0" / "predictions.csv").write_text(
        "not,a,predictions\nfile\n"
    )
    since = time.strftime("%Y-%m-%dT%H:%M:%S")
    run = sh(PROFILE, repo, check=False, timeout=600)
    assert run.returncode != 0
    assert "Error in rule report" in run.stdout + run.stderr, run.stderr[-3000:]
    jobs = slurm_jobs(since)
    assert jobs and {rule for rule, _ in jobs} == {"report"}
    assert all(state == "FAILED" for _, state in jobs), jobs
    assert len(jobs) == 2  # the first attempt and the profile's one retry
