"""Exceptions shared by the pipeline and the ``lcam`` command line."""

from __future__ import annotations

from typing import Callable, Mapping, Union

# Spells a config field (``augment``) as the flag the user typed (``--augment``, ``--img-augment``).
FlagNamer = Callable[[str], str]
Message = Union[str, Callable[[FlagNamer], str]]


def option_flag(field: str) -> str:
    """A config field as a stage's own command spells it: ``batch_size`` -> ``--batch-size``."""
    return "--" + field.replace("_", "-")


def flag_namer(names: Mapping[str, str]) -> FlagNamer:
    """A :data:`FlagNamer` for a command that spells some fields its own way (the rest as :func:`option_flag`)."""
    return lambda field: names.get(field) or option_flag(field)


class UserError(Exception):
    """A problem the user can fix (missing folder, bad labels file, damaged shard).

    The CLI prints the message without a traceback and exits with status 2, so the
    message must say what is wrong and what to do about it.

    A message that tells the user to change an option names it by its config field,
    not by a flag: ``UserError(lambda flag: f"... use {flag('augment')} center")``.
    ``str()`` spells fields as the stage's own command does (``--augment``); a job that
    runs the stage under other flags (``lcam pipeline``: ``--img-augment``) shows
    :meth:`spoken_as` with its own :data:`FlagNamer` instead, so the message always
    names the flags of the command the user typed.
    """

    def __init__(self, message: Message) -> None:
        self.compose: Callable[[FlagNamer], str] | None = message if callable(message) else None
        super().__init__(message(option_flag) if callable(message) else message)

    def spoken_as(self, flag: FlagNamer) -> "UserError":
        """This error with its options spelled by ``flag`` (same class; a plain message is unchanged)."""
        if self.compose is None:
            return self
        # The base initialiser: subclasses (CheckpointMismatch) take the same single message.
        out = type(self).__new__(type(self))
        UserError.__init__(out, self.compose(flag))
        return out
