"""The command line of every script here, by dpg_min.py's rule: bad input is one line that names
the script and what to do, exit status 2, no traceback."""
import sys

from dpg_min import BadInput


def run(command, name, argv=None):
    """command(argv), argv the command line's words unless given; BadInput: one line, exit 2."""
    try:
        return command(sys.argv[1:] if argv is None else argv)
    except BadInput as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        sys.exit(2)
