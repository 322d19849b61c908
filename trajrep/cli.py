"""The `trajrep` command: Lightning's subcommands and `extract` (trajrep.lightning_cli), and the tools with parsers of
their own, `reproduce`, `report` and `analyse`."""

import importlib
import sys

from lightning.pytorch.cli import ArgsType

# Each tool's module, whose main(args, prog) runs it; imported only when asked for.
TOOLS = {"reproduce": "trajrep.reproduce", "report": "trajrep.analysis.report", "analyse": "trajrep.analysis.per_task"}


def main(args: ArgsType = None) -> None:
    """Entry point of the console script; `args` lets tests run it in process."""
    command = sys.argv[1:] if args is None else args
    if isinstance(command, list) and command[:1] and command[0] in TOOLS:
        importlib.import_module(TOOLS[command[0]]).main(command[1:], prog=f"trajrep {command[0]}")
        return
    from trajrep.lightning_cli import run  # here: the tools need none of Lightning's CLI

    run(args)
