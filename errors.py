"""The error every CLI reports as one line on stderr with a non-zero exit (cli.run_cli)."""


class UserError(Exception):
    """Bad input from the user: a missing file, an out-of-range flag, a model we do not support."""
