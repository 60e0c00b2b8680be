"""`cola <stage>`: one subcommand per pipeline stage; Snakemake and DVC call only these."""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cola_audio import cpu_kernels
from cola_audio import params as params_mod
from cola_audio.errors import BadInput, InputError, environment_problem

log = logging.getLogger("cola_audio")


def _download(args: argparse.Namespace, params: dict) -> None:
    from cola_audio import download

    download.run(params, raw_dir=args.out)


def _prepare(args: argparse.Namespace, params: dict) -> None:
    from cola_audio import prepare

    prepare.run(params, out_dir=args.out, raw_dir=args.raw)


def _featurize(args: argparse.Namespace, params: dict) -> None:
    from cola_audio import featurize

    featurize.run(
        params,
        shard=args.shard,
        gather_only=args.gather,
        workers=args.workers,
        meta_dir=args.meta,
        out_dir=args.out,
    )


def _pretrain(args: argparse.Namespace, params: dict) -> None:
    from cola_audio import pretrain

    pretrain.run(params, features=args.features, meta_dir=args.meta, out_dir=args.out)


def _finetune(args: argparse.Namespace, params: dict) -> None:
    from cola_audio import finetune

    finetune.run(
        params,
        run_name=args.run,
        seed=args.seed,
        mode=args.mode,
        features=args.features,
        meta_dir=args.meta,
        encoder=args.encoder,
        out_dir=args.out,
    )


def _task_data(args: argparse.Namespace, params: dict) -> None:
    from cola_audio import tasks

    tasks.run(params, args.task, raw=args.raw, meta_dir=args.meta, out=args.out)


def _task_embed(args: argparse.Namespace, params: dict) -> None:
    from cola_audio import task_embed

    task_embed.embed_task(params, args.task, args.init, args.data, args.out, args.encoder)


def _probe(args: argparse.Namespace, params: dict) -> None:
    from cola_audio import probe

    probe.probe_task(params, args.task, args.data, args.embeddings, args.out)


def _report(args: argparse.Namespace, params: dict) -> None:
    from cola_audio import report

    report.run(
        params, out_dir=args.out, models=args.models, features=args.features, meta_dir=args.meta
    )


def _embed(args: argparse.Namespace, params: dict) -> None:
    from cola_audio import embed

    embed.run(args.paths, args.out, args.encoder, args.windows, args.batch_size, args.device)


def _positive_int(text: str) -> int:
    """An argparse type: a count that must be at least 1 (0 or less fails in argparse, with the
    usage, instead of as a traceback deep in the stage)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive whole number (use 1 or more)")
    return value


def _sync_dvc(args: argparse.Namespace, params: dict) -> None:
    from cola_audio import sync
    from cola_audio.stages import unwatched_by_dvc

    why_not = sync.blocked(Path("."))
    if why_not is not None:
        raise InputError(f"cola sync-dvc: not run: {why_not}")
    sync.run(unwatched_by_dvc(params))


def _dvc_commit(args: argparse.Namespace, params: dict) -> None:
    from cola_audio import dvc_commit

    dvc_commit.run()


def _dvc_yaml(args: argparse.Namespace, params: dict) -> None:
    from cola_audio import dvc_yaml

    same = dvc_yaml.run(Path("dvc.yaml"), check=args.check)
    if args.check and not same:
        raise BadInput(
            "dvc.yaml is not what the stage table renders (diff above); run `cola dvc-yaml` "
            "and commit it, never edit dvc.yaml by hand"
        )
    log.info("dvc.yaml %s", "is the render of the stage table" if same else "rendered anew")


def stage_name(args: argparse.Namespace) -> str | None:
    """The stage table's name for what this command runs (None for the tools): the subcommand's
    own name, but for the subcommands that serve several stages."""
    from cola_audio.stages import STAGES

    if args.stage == "featurize":
        return "featurize_gather" if args.gather else "featurize_shard"
    if args.stage == "finetune":
        return f"{args.mode}_{'scratch' if args.encoder is None else 'pretrained'}"
    if args.stage == "task-embed":
        return f"embed_{args.init}"
    if args.stage == "task-data":
        return "task_data"
    return args.stage if args.stage in STAGES else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cola", description=__doc__)
    parser.add_argument(
        "--params",
        type=Path,
        default=Path("params.yaml"),
        help="parameter file (default: params.yaml)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    _add_stages(sub)
    _add_tools(sub)
    return parser


def _add_stages(sub: Any) -> None:
    """The pipeline's stages, one subcommand each, in pipeline order."""
    p = sub.add_parser("download", help="fetch and verify FMA, or write the embedded dataset")
    p.add_argument("--out", type=Path, default=Path("data/raw"), help="the release's folders")
    p.set_defaults(func=_download)

    p = sub.add_parser("prepare", help="tracks.csv → metadata JSON (official split, labels)")
    p.add_argument("--raw", type=Path, default=Path("data/raw"))
    p.add_argument("--out", type=Path, default=Path("data/meta"))
    p.set_defaults(func=_prepare)

    p = sub.add_parser("featurize", help="audio → sharded log-mel feature store")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--shard", type=int, help="featurize only this shard (0-based)")
    group.add_argument("--gather", action="store_true", help="only join the shard indexes")
    p.add_argument("--workers", type=int, help="processes (default: features.workers)")
    p.add_argument("--meta", type=Path, default=Path("data/meta"))
    p.add_argument("--out", type=Path, default=Path("data/features"))
    p.set_defaults(func=_featurize)

    p = sub.add_parser("pretrain", help="COLA contrastive pretraining of the encoder")
    p.add_argument("--features", type=Path, default=Path("data/features"))
    p.add_argument("--meta", type=Path, default=Path("data/meta"))
    p.add_argument("--out", type=Path, default=Path("models/pretrain"))
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("finetune", help="genre classification: one run × seed")
    p.add_argument("--mode", required=True, choices=["finetune", "linear"])
    p.add_argument("--run", required=True, help="the run's name (its output folder)")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--features", type=Path, default=Path("data/features"))
    p.add_argument("--meta", type=Path, default=Path("data/meta"))
    p.add_argument(
        "--encoder", type=Path, help="start from this pretrained encoder (default: random init)"
    )
    p.add_argument("--out", type=Path, default=Path("models/finetune"))
    p.set_defaults(func=_finetune)

    p = sub.add_parser(
        "task-data", help="one downstream task's clips, split, kept out of pretraining"
    )
    p.add_argument("--task", required=True, help="a name under `tasks` in the params")
    p.add_argument("--raw", type=Path, default=Path("data/raw"))
    p.add_argument("--meta", type=Path, default=Path("data/meta"))
    p.add_argument("--out", type=Path, required=True, help="e.g. data/tasks/<task>/data")
    p.set_defaults(func=_task_data)

    p = sub.add_parser("task-embed", help="one vector per clip of a task, from one encoder")
    p.add_argument("--task", required=True)
    p.add_argument("--init", required=True, choices=["pretrained", "random"])
    p.add_argument("--data", type=Path, required=True, help="the task's `cola task-data` folder")
    p.add_argument("--encoder", type=Path, help="the pretrained encoder (--init pretrained)")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_task_embed)

    p = sub.add_parser("probe", help="linear probes on a task's embeddings, per label fraction")
    p.add_argument("--task", required=True)
    p.add_argument("--data", type=Path, required=True, help="the task's `cola task-data` folder")
    p.add_argument("--embeddings", type=Path, required=True, help="holds pretrained/ and random/")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_probe)

    p = sub.add_parser("report", help="results table, curves, confusion matrices, provenance")
    p.add_argument("--models", type=Path, default=Path("models"))
    p.add_argument("--features", type=Path, default=Path("data/features"))
    p.add_argument("--meta", type=Path, default=Path("data/meta"))
    p.add_argument("--out", type=Path, default=Path("reports"))
    p.set_defaults(func=_report)


def _add_tools(sub: Any) -> None:
    """Everything else: the trained encoder on your audio, and the DVC/Snakemake glue."""
    p = sub.add_parser("embed", help="embeddings of any audio files or folders (Parquet)")
    p.add_argument("paths", nargs="+", type=Path, help="audio files and folders (searched deeply)")
    p.add_argument("--out", type=Path, default=Path("embeddings.parquet"))
    p.add_argument("--encoder", type=Path, default=Path("models/pretrain/encoder.safetensors"))
    p.add_argument("--windows", action="store_true", help="one row per 1 s window, not per clip")
    p.add_argument(
        "--batch-size", type=_positive_int, default=64, help="windows per forward pass (≥ 1)"
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: a GPU when present)")
    p.set_defaults(func=_embed, needs_params=False)

    p = sub.add_parser(
        "sync-dvc",
        help="restore from DVC's cache what it already built for these params, and let Snakemake "
        "trust what DVC verified (the Snakefile runs it before a real run plans its jobs)",
    )
    p.set_defaults(func=_sync_dvc)

    p = sub.add_parser(
        "dvc-commit",
        help="`dvc commit` of the stages whose build records match DVC's view, keeping output "
        "mtimes so Snakemake does not rebuild (run by the Snakefile after every run)",
    )
    p.set_defaults(func=_dvc_commit)

    p = sub.add_parser(
        "dvc-yaml", help="render dvc.yaml from the stage table (--check: fail if it differs)"
    )
    p.add_argument("--check", action="store_true")
    p.set_defaults(func=_dvc_yaml, needs_params=False)


def main(argv: Sequence[str] | None = None) -> int:
    cpu_kernels.pin()  # before any stage loads torch: the same bytes on any x86 CPU
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if threading.current_thread() is threading.main_thread():  # where Python allows handlers
        signal.signal(signal.SIGTERM, _terminated)
    try:
        needs_params = getattr(args, "needs_params", True)
        params = params_mod.load(args.params) if needs_params else {}
        name = stage_name(args)
        if name is None:
            args.func(args, params)
        else:
            run_stage(name, args, params, list(argv if argv is not None else sys.argv[1:]))
    except InputError as exc:  # bad input a user can fix: one line naming it and the fix
        print(f"cola {args.stage}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, params_mod.ParamsError) else 1
    except subprocess.CalledProcessError as exc:  # dvc or snakemake, which printed their reason
        print(f"cola {args.stage}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # no space, no permission: the machine, named with the path
        if (problem := environment_problem(exc, getattr(args, "out", None))) is None:
            raise
        print(f"cola {args.stage}: error: {problem}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, SystemExit) as exc:  # Ctrl-C, SIGTERM; Lightning's SIGTERM exit
        if type(exc) is SystemExit:
            raise  # an ordinary exit keeps its code
        print(
            f"cola {args.stage}: interrupted; a training stage resumes from its last epoch "
            "checkpoint when rerun",
            file=sys.stderr,
        )
        return 143 if _by_sigterm(exc) else 130
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, Snakemake stopping its jobs) ends a stage as Ctrl-C does: the
    `finally` blocks run, so no temporary file stays behind (Python's default just exits)."""


def _terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def _by_sigterm(exc: BaseException) -> bool:
    """Ours, or Lightning's SIGTERMException (looked up, not imported: most stages never load
    Lightning, and importing it costs seconds)."""
    lightning = sys.modules.get("pytorch_lightning.utilities.exceptions")
    return isinstance(exc, Terminated) or (
        lightning is not None and isinstance(exc, lightning.SIGTERMException)
    )


def run_stage(name: str, args: argparse.Namespace, params: dict, argv: list[str]) -> None:
    """Run a stage on the params it declares (plus its speed knobs) and nothing else, so a key it
    reads without declaring fails here, not silently in one tool; a pipeline job (the exact
    command both tools run) also records what its outputs were built from (buildrecord.py)."""
    from cola_audio import buildrecord, stages  # the table is no code dependency of a stage

    stage = stages.STAGES[name]
    _refuse_unlisted(stage, args, params)
    job = stages.by_command(argv, params)
    if job is None:
        given = {
            w: str(getattr(args, w)) for w in stage.matrix if getattr(args, w, None) is not None
        }
        args.func(args, stage.readable(params, given))
        return
    stage, item = job
    deps = [stages.fill(d, item) for d in [*stage.code(), *stage.dvc_deps()]]
    started = buildrecord.state(deps)
    args.func(args, stage.readable(params, item))
    outs = [stages.fill(o.path, item) for o in stage.outs.values()]
    if not buildrecord.write(
        stage.addressing(item), stage.declared(params, item), started, deps, outs
    ):
        log.warning(
            "%s: an input changed while it ran; not recorded as built, so `cola dvc-commit` "
            "will not commit it (rerun it)",
            stage.addressing(item),
        )


def _refuse_unlisted(stage: Any, args: argparse.Namespace, params: dict) -> None:
    """A job of a matrix stage must be one params.yaml lists (a run under its own mode, a listed
    seed or shard): its outputs would otherwise stand where a listed job's belong."""
    values = {w: getattr(args, w, None) for w in stage.matrix}
    if None in values.values():  # e.g. `cola featurize` without --shard: every listed shard
        return
    item = {w: str(v) for w, v in values.items()}
    if item not in stage.items(params):
        raise BadInput(
            f"{stage.addressing(item)} is not a job of {args.params} "
            f"({', '.join(stage.matrix.values())}): add it there first, so both tools know it"
        )


if __name__ == "__main__":
    sys.exit(main())
