"""User-caused errors: the CLI turns them into one line on stderr and exit status 2."""


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, unknown config key, empty data).

    Raise it anywhere; `mmssl.cli.main` prints `mmssl: error: <message>` and exits 2, no traceback.
    """


def require(condition: bool, message: str) -> None:
    """Raise UserError(message) unless condition holds."""
    if not condition:
        raise UserError(message)
