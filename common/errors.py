"""The base of every error a user can fix (a bad path, value or name).

Each package raises its own subclass (``ImageError`` here, ``models.errors.ModelError``,
``methods.errors.MethodError``, ``evaluation.errors.DataError`` ...); the application layer
(:func:`app.lifecycle.run_cli`) turns any :class:`ToolkitError` into one stderr line and exit code 2.
"""


class ToolkitError(ValueError):
    """A problem with the user's input, worded for one line."""


class ImageError(ToolkitError):
    """An image path that is missing, empty or unreadable."""


class OutputError(ToolkitError):
    """A result file that cannot be written (an output path that is a file, a full disk, no permission)."""
