"""Errors a user can act on.

A `UserError` names the problem and the fix in one line. The CLI prints it and exits with
code 2; it never shows a traceback from deep inside a library.
"""


class UserError(Exception):
    """Bad input: one line that says what is wrong and how to fix it."""
