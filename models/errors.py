"""Errors of the model registry: unknown names, missing or mismatching weights, bad target layers."""
from common.errors import ToolkitError


class ModelError(ToolkitError):
    """A model that cannot be built as asked."""
