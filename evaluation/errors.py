"""Errors of the dataset readers and the results store."""
from common.errors import ToolkitError


class DataError(ToolkitError):
    """A dataset, annotation or labels file that cannot be used as given."""


class StoreError(ToolkitError):
    """An output folder that cannot hold this run's results (other settings, unreadable records)."""


class EvaluationError(ToolkitError):
    """A run that produced nothing to report (every item skipped)."""
