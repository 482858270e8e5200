"""The errors of UCAG settings the library refuses (a NaN alpha, n = 1, a blend its protocol does not allow).

Each keeps the parts of its one-line message, so that a caller with other names for the settings (the
scripts' flags) can word the same refusal with them.
"""
from methods.errors import MethodError


class UCAGError(MethodError):
    """A UCAG setting or call the library refuses, worded for one line."""


class SettingError(UCAGError):
    """``setting`` out of its range or of the wrong type: '<setting> must be <requirement>, got <value>'."""

    def __init__(self, setting: str, requirement: str, value):
        super().__init__(f"{setting} must be {requirement}, got {value!r}")
        self.setting, self.requirement, self.value = setting, requirement, value


class BlendRefused(UCAGError):
    """A known blend that ``protocol`` (its name) does not allow, with the blends it does."""

    def __init__(self, blend: str, protocol: str, allowed: tuple[str, ...]):
        choice = " or ".join(f"blend={name!r}" for name in allowed)
        super().__init__(f"blend={blend!r} is not the {protocol} code's fold: {protocol} needs {choice}")
        self.blend, self.protocol, self.allowed = blend, protocol, allowed
