"""`snakemake --executor record-jobs`: a dry run that writes each job as one JSON line to the file
named by $COLA_RECORD_JOBS (rule, wildcards, inputs, outputs, params, shell command).

The parity test reads Snakemake's DAG through this plugin, i.e. through Snakemake's public plugin
interfaces only: Snakemake finds it by its module name on PYTHONPATH (tests/dag.py puts it there),
the job's `properties()` are what a cluster job script receives, and the shell command is the one
field of the job-info log event (the event logger plugins are given) that `properties()` lacks.
"""

from __future__ import annotations

import json
import logging
import os

from snakemake_interface_executor_plugins.executors.base import AbstractExecutor, SubmittedJobInfo
from snakemake_interface_executor_plugins.jobs import JobExecutorInterface
from snakemake_interface_executor_plugins.settings import CommonSettings
from snakemake_interface_logger_plugins.common import LogEvent

common_settings = CommonSettings(
    non_local_exec=False,
    dryrun_exec=True,  # nothing runs, nothing is written, no hooks: like `snakemake -n`
    implies_no_shared_fs=False,
    job_deploy_sources=False,
    pass_envvar_declarations_to_cmd=False,
    auto_deploy_default_storage_provider=False,
)


class _ShellCommands(logging.Handler):
    """Keeps the shell command of each job-info event, by job id."""

    def __init__(self) -> None:
        super().__init__()
        self.by_jobid: dict[int, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "event", None) == LogEvent.JOB_INFO:
            self.by_jobid[record.jobid] = record.shellcmd


class Executor(AbstractExecutor):
    def printjob(self, job: JobExecutorInterface) -> None:
        shell_commands = _ShellCommands()
        self.logger.addHandler(shell_commands)  # the `logging.Logger` Snakemake gives executors
        try:
            super().printjob(job)  # emits the job-info event
        finally:
            self.logger.removeHandler(shell_commands)
        properties = json.loads(job.properties())
        if "params" not in properties:
            raise TypeError(
                f"rule {job.rule.name}: properties() are not JSON (Snakemake dropped the params)"
            )
        line = {
            "rule": job.rule.name,
            "wildcards": properties["wildcards"],
            "input": list(job.input),
            "output": list(job.output),
            "params": properties["params"],
            "shellcmd": shell_commands.by_jobid[job.jobid],
        }
        with open(os.environ["COLA_RECORD_JOBS"], "a", encoding="utf-8") as record:
            record.write(json.dumps(line) + "\n")

    def run_job(self, job: JobExecutorInterface) -> None:
        job_info = SubmittedJobInfo(job=job)
        self.report_job_submission(job_info)
        self.report_job_success(job_info)

    def get_exec_mode(self):
        raise NotImplementedError

    def handle_job_success(self, job: JobExecutorInterface) -> None:
        pass

    def handle_job_error(self, job: JobExecutorInterface) -> None:
        pass

    def cancel(self) -> None:
        pass

    def shutdown(self) -> None:
        pass
