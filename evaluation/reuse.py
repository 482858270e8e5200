"""The base row taken from another run (``--base-from FOLDER``): a sweep of UCAG's settings (alpha, n, c,
the blend, ...) computes the method's own row once.

The other run is trusted only through its identity: its run.json must equal this run's identity in every
setting but those that concern the UCAG row alone (:data:`UCAG_ROW_SETTINGS`), so its base-row scores are
exactly what this run would compute (the same model, weights, method and options, images, labels, target,
metric and its settings, device type, precision). A batch whose images all have a base-row result there
takes those scores and skips the base row; any other batch computes it (a partial run can be reused).
"""
from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

from common.images import display_path
from evaluation.errors import StoreError
from evaluation.store import ABOUT, StoredRecords, identity_differences, read_run_json, record_index

# Identity settings that concern only the UCAG row: they may differ between the two runs.
UCAG_ROW_SETTINGS = ("ucag", "alpha", "crop", "n", "confidence", "blend", "crop_input")


def base_identity(identity: dict) -> dict:
    """The settings the base row's scores depend on."""
    return {key: value for key, value in identity.items() if key not in UCAG_ROW_SETTINGS and key != ABOUT}


class ReusedBaseRow:
    """The base row ``row`` of the run in ``folder``, checked against this run's ``identity``; ``keys``: this
    run's items (only their records are indexed: positions, not the records, stay in memory)."""

    def __init__(self, folder: str | Path, out: str | Path, row: str, identity: dict, keys: Collection[str]):
        self.folder, self.row = Path(folder), row
        shown = display_path(str(folder))
        if self.folder.resolve() == Path(out).resolve():
            raise StoreError(f"--base-from {shown} is this run's own --out")
        recorded = read_run_json(self.folder)
        if recorded is None:
            raise StoreError(f"--base-from {shown}: no run.json there (not a run folder)")
        changed = identity_differences(base_identity(recorded), base_identity(identity))
        if changed:
            raise StoreError(f"--base-from {shown} was run with other settings for the base row "
                             f"({', '.join(changed)}); its scores would not be this run's")
        self.places = record_index(self.folder, set(keys))
        self.used = 0  # batches that took their base row from the folder

    def scores(self, keys: Sequence[str]) -> list[dict] | None:
        """The base row's stored scores of each of ``keys``, or None unless every one of them has them."""
        if not all(key in self.places for key in keys):
            return None
        records = list(StoredRecords([self.places[key] for key in keys]))
        if not all(self.row in record.get("rows", {}) for record in records):
            return None
        self.used += 1
        return [record["rows"][self.row] for record in records]
