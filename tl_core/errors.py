"""Errors a user can act on.

A `UserError` names the problem and the fix in one line. The CLI prints it and exits with
code 2; it never shows a traceback from deep inside a library.
"""

from __future__ import annotations

import errno


class UserError(Exception):
    """Bad input: one line that says what is wrong and how to fix it."""


# A local path the system refused (TL_WORKDIR, --output, a data folder): what to do about it.
PATH_FIXES = {
    errno.ENOENT: "it, or a folder above it, does not exist and cannot be made there: check the path",
    errno.EEXIST: "a file is where a folder must be: move the file, or choose another path",
    errno.ENOTDIR: "a file is where a folder must be: move the file, or choose another path",
    errno.EISDIR: "a folder is where a file must be: give a file's path",
    errno.EACCES: "choose a folder you can write to, or fix its permissions",
    errno.EPERM: "choose a folder you can write to, or fix its permissions",
    errno.EROFS: "the file system is read-only: choose a folder on a writable one",
    errno.ENOSPC: "the disk is full: free space, or choose a folder on another disk",
    errno.EDQUOT: "the disk quota is used up: free space, or choose a folder on another disk",
}


def path_error(err: OSError) -> UserError | None:
    """A local file system's refusal of a path as one line that names the path and the fix; None
    for an OSError that names no path (a socket's, a process's: not bad input)."""
    if err.filename is None:
        return None
    fix = PATH_FIXES.get(err.errno, "check the path, and that you may read and write there")
    return UserError(f"{err.filename}: {err.strerror or err.__class__.__name__}: {fix}")
