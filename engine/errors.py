"""The one error type the engine raises for bad input.

Every public entry point (CLI, engine API, UI, trainer sources) turns a bad file, a bad
instruction or a model that produced garbage into an :class:`InputError` with a plain-language
message that says what is wrong and, where possible, what to do about it. The CLI maps it to
exit code 2 and one line on stderr; the UI shows the message and keeps serving.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user: a file, an instruction, a model folder or a setting.

    Subclasses ``ValueError`` so callers that already catch ``ValueError`` keep working.
    """


class ModelFolderError(InputError):
    """A model folder (or hub id) that is missing, incomplete or inconsistent."""
