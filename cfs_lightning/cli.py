"""The `cfs` entry point: `cfs COMMAND ...` runs the command of `commands.COMMANDS`."""

from __future__ import annotations

import logging
import sys

from .commands import COMMANDS, call, function, usage


def show_logs() -> None:
    """Print cfs_lightning's INFO lines (how often each replay sequence is seen, the share of
    tokens masked, ...) on stderr, as Lightning prints its own. A program that has configured
    logging itself (a root handler, or one on `cfs_lightning`) is left as it is."""
    logger = logging.getLogger("cfs_lightning")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> None:
    from_command_line = argv is None
    if from_command_line:
        show_logs()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        sys.exit(f"cfs: unknown command {name!r}\n\n{usage()}")
    if COMMANDS[name].lightning:
        function(name)(None if from_command_line else argv)
    else:
        call(function(name), rest)


if __name__ == "__main__":
    main()
