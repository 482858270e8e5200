"""Errors of the explainer registry: unknown methods, bad option values, unsupported architectures."""
from common.errors import ToolkitError


class MethodError(ToolkitError):
    """An explainer that cannot be built or run as asked."""
