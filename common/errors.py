"""The one exception type for mistakes a user can fix (bad path, bad flag, unknown name)."""


class UserError(ValueError):
    """A problem with the user's input; scripts print its message on one line and exit with code 2."""
