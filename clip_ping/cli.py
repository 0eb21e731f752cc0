"""The ``clip-ping`` command line.

Each subcommand is one pipeline stage: a config dataclass (its fields become
the flags, ``--config FILE.yaml`` supplies defaults) and the function that
runs it. User mistakes end with a one-line ``error:`` message and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from .config import add_config_arguments, config_from_args
from .environment import check_environment, require
from .errors import ClipPingError


@dataclass(frozen=True)
class Command:
    path: tuple[str, ...]        # e.g. ("data", "synth")
    config: str                  # "module:ConfigClass"
    run: str                     # "module:function" taking the config
    help: str
    plan: str = "clip_ping.plan:plan_config_only"  # what --dry-run prints
    needs: tuple[str, ...] = ()  # extras (clip_ping.environment.EXTRAS) the command cannot run without


COMMANDS = [
    Command(("data", "synth"), "clip_ping.data.synth:SynthConfig", "clip_ping.data.synth:generate_synthetic",
            "write the built-in procedural image-text data set (train/val/test CSVs + images)"),
    Command(("data", "convert"), "clip_ping.data.convert:ConvertConfig", "clip_ping.data.convert:convert",
            "convert a data set between CSV and WebDataset shards"),
    Command(("data", "openclipart"), "clip_ping.data.openclipart:OpenClipartConfig",
            "clip_ping.data.openclipart:convert_openclipart",
            "convert Debian's OpenClipart library into a captioned, labelled data set"),
    Command(("data", "folders"), "clip_ping.data.folders:ImageFolderConfig", "clip_ping.data.folders:image_folder_to_csv",
            "turn image folders (one per class) into a labelled CSV for classification evaluation"),
    Command(("extract",), "clip_ping.banks.extract:ExtractConfig", "clip_ping.banks.extract:extract_banks",
            "stage 1: run the frozen teachers and write the image and text feature banks", "clip_ping.plan:plan_extract"),
    Command(("neighbors",), "clip_ping.knn:NeighborsConfig", "clip_ping.knn:build_neighbors",
            "find each sample's image-side and text-side nearest neighbours (exact tiled search; FAISS for the "
            "approximate methods)", "clip_ping.plan:plan_neighbors"),
    Command(("neighbors", "show"), "clip_ping.knn:ShowConfig", "clip_ping.knn:show_neighbors",
            "write an HTML page of samples with their NN and XNN, print label agreement"),
    Command(("train",), "clip_ping.training.trainer:TrainConfig", "clip_ping.training.trainer:train",
            "stage 2: train a student with CLIP-PING (or plain CLIP with --method clip)", "clip_ping.plan:plan_train"),
    Command(("eval",), "clip_ping.evaluation.stage:EvalConfig", "clip_ping.evaluation.stage:evaluate_from_config",
            "zero-shot classification, retrieval and linear probe of a checkpoint"),
    Command(("export",), "clip_ping.hub.export:ExportConfig", "clip_ping.hub.export:export_open_clip",
            "write a checkpoint as an open_clip model folder (config JSON + weights)"),
    Command(("convert-checkpoint",), "clip_ping.training.checkpoints:ConvertCheckpointConfig",
            "clip_ping.training.checkpoints:convert_checkpoint",
            "rewrite a checkpoint of an earlier clip-ping (which only the unsafe loader reads) in the safe form"),
    Command(("report",), "clip_ping.report.build:ReportConfig", "clip_ping.report.build:report_from_config",
            "compare runs: markdown table, training curves, bar charts, index.html", needs=("report",)),
    Command(("demo",), "clip_ping.demo:DemoConfig", "clip_ping.demo:run_demo",
            "the whole pipeline on the built-in data: CLIP vs CLIP-PING, with a report", "clip_ping.plan:plan_demo",
            needs=("teachers", "faiss-cpu", "probe", "report")),
]


def _load(spec: str) -> Any:
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def requested_command(argv: list[str]) -> tuple[str, ...]:
    """The command path the command line names: its leading words, after the global flags, while they name a
    command or a group (``["neighbors", "show", "--banks", "b"]`` -> ``("neighbors", "show")``)."""
    words = iter(argv)
    path: tuple[str, ...] = ()
    for word in words:
        if not word.startswith("-"):
            path = (word,)
            break
    else:
        return ()
    for word in words:
        if not any(c.path[:len(path) + 1] == (*path, word) for c in COMMANDS):
            break
        path = (*path, word)
    return path


def build_parser(only: tuple[str, ...] | None = None) -> argparse.ArgumentParser:
    """The whole command line. With ``only``, the flags of that command alone are built: a command's flags
    import its config module (for most, torch), which ``clip-ping --help`` does not need."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="clip-ping",
        description="Train lightweight CLIP models with nearest-neighbour guidance from frozen teachers (CLIP-PING).",
        epilog="Pipeline: data synth -> extract -> neighbors -> train -> eval -> report (or all at once: demo).",
    )
    parser.add_argument("--version", action="version", version=f"clip-ping {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[tuple[str, ...], argparse._SubParsersAction] = {(): subparsers}
    parsers: dict[tuple[str, ...], argparse.ArgumentParser] = {}
    for command in COMMANDS:
        parent = command.path[:-1]
        if parent not in groups:
            parent_parser = parsers.get(parent)
            if parent_parser is None:
                parent_parser = groups[parent[:-1]].add_parser(parent[-1], help=f"{parent[-1]} commands")
                parsers[parent] = parent_parser
            groups[parent] = parent_parser.add_subparsers(dest="_".join(parent) + "_action", metavar="ACTION")
        sub = groups[parent].add_parser(command.path[-1], help=command.help, description=command.help)
        sub.set_defaults(_command=command)
        if only is None or command.path == only:
            add_config_arguments(sub, _load(command.config))
        sub.add_argument("--dry-run", action="store_true",
                         help="validate the configuration, open the data and print the plan (rows, steps, memory, disk); do no work")
        parsers[command.path] = sub
    parser.set_defaults(_groups=parsers)
    return parser


def _print_result(result: Any) -> None:
    if result is None:
        return
    if isinstance(result, (dict, list)):
        print(json.dumps(result, indent=2, default=str))
    else:
        print(result)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(only=requested_command(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("PIL", "matplotlib", "urllib3", "httpx", "huggingface_hub", "sentence_transformers", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    command: Command | None = getattr(args, "_command", None)
    if command is None:  # a group without its action, e.g. `clip-ping data`: show the group's actions
        group = getattr(args, "_groups", {}).get((args.command,)) if getattr(args, "command", None) else None
        (group or parser).print_help()
        return 1
    # Every torch.load in this process, third-party code's included, reads tensors and plain values only
    # (clip-ping's own calls say weights_only=True anyway); unless the user asked torch for the opposite.
    if not os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        check_environment()
        if not args.dry_run:
            for extra in command.needs:
                require(extra)
        cfg = config_from_args(_load(command.config), args)
        run: Callable[[Any], Any] = _load(command.plan if args.dry_run else command.run)
        _print_result(run(cfg))
    except ClipPingError as exc:
        print(f"clip-ping {' '.join(command.path)}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
