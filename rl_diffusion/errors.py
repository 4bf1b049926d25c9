"""One exception family for mistakes a user can fix; the CLI prints it as one line."""


class UserError(Exception):
    """Bad input from a user: unknown name, malformed value, missing or foreign file.

    The message says what is wrong and what to do; the CLI prints it as
    ``error: <message>`` and exits with status 2, without a traceback.
    """


def nearest(name: str, choices) -> str:
    """A ' (did you mean ...?)' suffix naming the closest valid choices, or ''."""
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
