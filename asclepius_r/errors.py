"""Errors a user can act on, told apart from bugs.

A bad NOTEEVENTS file, a wrong config key, an endpoint not approved for notes, a spent budget:
their messages already say what is wrong and where (file, line, config key), so an entry point
ends with that one message. logs.setup_logging, which every scripts/ entry and `python -m` CLI
calls first, installs the hook that does so; any other exception keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of the errors whose message is the whole story: no traceback is shown for them."""


class InputError(UserError, ValueError):
    """An input file or folder the user gave cannot be used; the message names it (and the line)."""


class BaseModelError(InputError):
    """A base model folder or file the workflow cannot use; the message names it and what is missing."""
