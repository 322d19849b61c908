"""Messages from Lightning that trajrep knows to be harmless in its own use, silenced in one place.

Each entry says why it does not apply; every other warning is kept. `silence_known_noise()` runs where a trajrep
command starts (the CLI, and so every preset stage and sweep run).
"""

import logging
import re
import warnings

# (start of the message, why it does not apply to trajrep)
HARMLESS_WARNINGS = (
    ("`isinstance(treespec, LeafSpec)` is deprecated", "inside Lightning itself; nothing a user can change"),
    ("Your `IterableDataset` has `__len__` defined", "the probes' SeededBatches is read with num_workers=0"),
    ("You're using the WeightAveraging callback with a model that overrides the configure_model",
     "PretrainModule's configure_model shards nothing (it sets fast paths), and is safe to call twice"),
    ("Precision bf16-mixed is not supported by the model summary", "only the summary's size in MB is estimated"),
    ("Starting from v1.9.0, `tensorboardX` has been removed", "the CSV logger is trajrep's intended default"),
    ("LightningCLI's args parameter is intended to run from within Python",
     "presets and sweeps run each stage as a LightningCLI given its own args while sys.argv holds theirs"),
)
# INFO lines of Lightning that are advertising, not information.
HARMLESS_INFO = ("try installing [litlogger]",)


class DropAdvertising(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in HARMLESS_INFO)


def silence_known_noise() -> None:
    """Ignore the warnings in HARMLESS_WARNINGS and drop Lightning's HARMLESS_INFO lines (idempotent)."""
    for message, _why in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message))
    lightning = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, DropAdvertising) for f in lightning.filters):
        lightning.addFilter(DropAdvertising())
