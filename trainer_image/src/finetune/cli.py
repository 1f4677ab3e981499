"""The `finetune` command line.

finetune validate JOB.yaml...   check job files; exit 2 listing every problem
finetune crd [-o FILE]          print (or write) the CustomResourceDefinition
finetune run JOB.yaml           train the job on this machine
finetune train JOB.yaml         a training pod's entrypoint: its node of the gang
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__

if TYPE_CHECKING:
    from .trainer.process.stopping import StopRequest

EXIT_OK = 0
EXIT_INVALID = 2


def _validate(args: argparse.Namespace) -> int:
    from .api.loading import load_file

    status = EXIT_OK
    for path in args.files:
        result = load_file(path)
        if result.ok:
            names = ", ".join(job.metadata.name for job in result.jobs)
            if not args.quiet:
                print(f"{path}: valid ({names})")
            continue
        status = EXIT_INVALID
        for problem in result.problems:
            print(f"{path}: {problem}", file=sys.stderr)
    return status


def _crd(args: argparse.Namespace) -> int:
    from .api.crd import render_crd_yaml

    text = render_crd_yaml()
    if args.output:
        try:
            Path(args.output).write_text(text, encoding="utf-8")
        except OSError as exc:
            print(f"error: --output {args.output}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_INVALID
    else:
        sys.stdout.write(text)
    return EXIT_OK


def _load_or_exit(path: str) -> Any:
    from .api.loading import JobFileError, load_job

    try:
        return load_job(path)
    except JobFileError as exc:
        print(str(exc), file=sys.stderr)
        return None


def _run(args: argparse.Namespace) -> int:
    stop = _stop_request()
    job = _load_or_exit(args.job)
    if job is None:
        return EXIT_INVALID
    from .trainer.launcher.run import run_local

    return run_local(job.spec.training_spec(), job.metadata.name, args.nproc, args.output, stop)


def _train(args: argparse.Namespace) -> int:
    stop = _stop_request()
    job = _load_or_exit(args.job)
    if job is None:
        return EXIT_INVALID
    from .trainer.launcher.run import run_in_pod

    return run_in_pod(job.spec.training_spec(), job.metadata.name, stop)


def _stop_request() -> StopRequest:
    """Installed before torch loads (seconds): a Ctrl-C meanwhile is remembered and ends
    the start with exit 130, not a KeyboardInterrupt traceback."""
    from .trainer.process.stopping import StopRequest

    return StopRequest()


def _not_empty(value: str) -> str:
    """An argument that names something: an empty one (`--output "$UNSET"`) is refused
    rather than taken as absent."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def _output_uri(value: str) -> str:
    """`--output`: where results can be written, as `spec.output.uri` takes it."""
    from .api.common import check_storage_uri

    try:
        return check_storage_uri(_not_empty(value))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune",
        description="Fine-tune Stable Diffusion models from FineTuneJob files.",
    )
    parser.add_argument("--version", action="version", version=f"finetune {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    validate = commands.add_parser(
        "validate",
        help="check job files",
        description="Check FineTuneJob files. Exits 0 when all are valid, 2 otherwise, "
        "printing one line per problem that names the file and the field.",
    )
    validate.add_argument("files", nargs="+", metavar="JOB.yaml")
    validate.add_argument("-q", "--quiet", action="store_true", help="print problems only")
    validate.set_defaults(handler=_validate)

    crd = commands.add_parser(
        "crd",
        help="print the CustomResourceDefinition",
        description="Print the FineTuneJob CRD generated from the API models.",
    )
    crd.add_argument(
        "-o", "--output", type=_not_empty, help="write to this file instead of standard output"
    )
    crd.set_defaults(handler=_crd)

    run = commands.add_parser(
        "run",
        help="train a job on this machine",
        description="Train a FineTuneJob on this machine with DeepSpeed: N processes, one per GPU "
        "(or on the CPU with gloo). Ctrl-C, SIGTERM or SIGHUP stop after saving a checkpoint "
        "(exit 130); running the same command again resumes from the newest complete "
        "checkpoint. A second run into an output in use is refused (exit 2).",
    )
    run.add_argument("job", metavar="JOB.yaml")
    run.add_argument(
        "--nproc",
        type=int,
        help="training processes, at most one per GPU or CPU core (default: one per GPU, or 1)",
    )
    run.add_argument(
        "--output",
        metavar="URI",
        type=_output_uri,
        help="write results here instead of spec.output.uri",
    )
    run.set_defaults(handler=_run)

    train = commands.add_parser(
        "train",
        help="run one node of a training gang (the trainer image's entrypoint)",
        description="Train this pod's share of a FineTuneJob; the rendezvous comes from "
        "FINETUNE_NNODES, FINETUNE_NODE_RANK (or JOB_COMPLETION_INDEX), FINETUNE_NPROC_PER_NODE, "
        "MASTER_ADDR and MASTER_PORT.",
    )
    train.add_argument("job", metavar="JOB.yaml")
    train.set_defaults(handler=_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
