"""The error every CLI reports as one line on stderr with a non-zero exit."""
import sys


class UserError(Exception):
    """Bad input from the user: a missing file, an out-of-range flag, a model we do not support."""


def run_cli(main):
    """Call main(); a UserError (or Ctrl-C) ends the process with one line on stderr, no traceback."""
    try:
        return main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def sparsity_list(text: str, flag: str, up_to_one: bool = False) -> list:
    """A flag's comma-separated sparsity levels, each in [0, 1) (or [0, 1])."""
    try:
        levels = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"{flag} takes comma-separated numbers, got {text!r}") from None
    if not levels or not all(0 <= s < 1 or (up_to_one and s == 1) for s in levels):
        raise UserError(f"{flag} levels must lie in [0, 1{']' if up_to_one else ')'}, got {text!r}")
    return levels
