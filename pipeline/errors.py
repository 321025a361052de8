"""Exceptions shared by the pipeline and the ``lcam`` command line."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (missing folder, bad labels file, damaged shard).

    The CLI prints the message without a traceback and exits with status 2, so the
    message must say what is wrong and what to do about it.
    """
