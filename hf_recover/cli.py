"""`hf-recover`: prune language models and recover them by distillation, from the command line.

    hf-recover demo                                   # prune and recover the embedded default, print the table
    hf-recover importance --model default --output_dir out/importance
    hf-recover prune --model default --prune importance:6 --output_dir out/student
    hf-recover select --model default --prune importance:6 last:6 angular:6
    hf-recover recover --teacher default --student out/student --output_dir out/recovered
    hf-recover generate --teacher default --output_dir out/teacher-data --num_prompts 256
    hf-recover cache --teacher default --output_dir out/teacher-cache --top_k 64
    hf-recover recover --teacher default --student out/student --teacher_cache out/teacher-cache
    hf-recover evaluate --model out/recovered --teacher default --pruned out/student
    hf-recover compare --output_dir out/lab           # the strategy lab
    hf-recover push --folder out/recovered --repo_id you/smollm2-recovered

Every command takes `--config file.yaml`, whose keys are the command's flag names; flags given on the
command line win over the file. `hf-recover COMMAND --help` lists each command's flags.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

COMMANDS = ("demo", "importance", "prune", "select", "generate", "cache", "recover", "evaluate", "compare", "push")


def command_module(name: str):
    """The module of the command `name` (`hf_recover.scripts.NAME`): its `make_parser` and `main`."""
    if name not in COMMANDS:
        raise ValueError(f"Unknown command {name!r}; commands: {', '.join(COMMANDS)}.")
    return import_module(f"hf_recover.scripts.{name}")


def make_root_parser() -> argparse.ArgumentParser:
    from transformers import HfArgumentParser

    parser = argparse.ArgumentParser(
        prog="hf-recover", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=HfArgumentParser)
    for name in COMMANDS:
        command_module(name).make_parser(subparsers)
    return parser


def parse_command(parser, argv: list[str]) -> tuple:
    """Parse `argv` into the command's dataclasses, with `--config file.yaml` giving defaults."""
    argv = list(argv)
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise SystemExit("--config needs a YAML file path.")
        apply_yaml_defaults(parser, argv[i + 1])
        del argv[i : i + 2]
    return parser.parse_args_into_dataclasses(argv)


def apply_yaml_defaults(parser, path: str) -> None:
    """Use the keys of a YAML file as the parser's defaults; unknown keys are an error."""
    from pathlib import Path

    import yaml

    if not Path(path).is_file():
        raise SystemExit(f"--config: no such file {path}.")
    values = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(values, dict):
        raise SystemExit(f"--config: {path} must hold a mapping of flag names to values.")
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SystemExit(f"--config: unknown keys {unknown} in {path}; run with --help for the valid flags.")
    for action in parser._actions:  # a value given in the file makes a required flag optional
        if action.dest in values:
            action.required = False
    parser.set_defaults(**values)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    root = make_root_parser()
    if not argv or argv[0] not in COMMANDS:
        root.parse_args(argv)  # prints usage / --help / the unknown-command error
        return
    subparser = root._subparsers._group_actions[0].choices[argv[0]]
    dataclasses = parse_command(subparser, argv[1:])
    command_module(argv[0]).main(*dataclasses)


if __name__ == "__main__":
    main()
