"""The `cfs` entry point: `cfs COMMAND ...` runs the command of `commands.COMMANDS`."""

from __future__ import annotations

import sys

from .commands import COMMANDS, call, function, usage


def main(argv: list[str] | None = None) -> None:
    from_command_line = argv is None
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
