"""The building blocks of the config sections: ConfigError, the field helper `_c` and the numeric bounds.

Re-exported by pipeline.config; stdlib only (config errors are answered before torch is imported).
"""
from __future__ import annotations

import copy
import re
from dataclasses import field
from typing import Any, Sequence

from pipeline import PipelineError

# Bounds that keep every number within what the code can handle (numpy seeds are 32-bit; a
# learning rate above 10 only diverges; bigger images or thread pools exhaust memory before use).
MAX_SEED = 2 ** 32 - 1
MAX_LR = 10.0
MAX_EPOCHS = 100_000
MAX_BATCH = 1_000_000
MAX_NAME = 100


class ConfigError(PipelineError):
    """A params file or override that cannot be used; the message names the key."""


def _c(default: Any, help: str, **constraints: Any) -> Any:
    """A field with a help text and constraints (gt, ge, le, choices, item_choices)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default),
                     metadata={"help": help, **constraints})
    return field(default=default, metadata={"help": help, **constraints})


# Feature taps (backbone.taps, head.tap, sweep.taps; pipeline/taps.py computes them).
TAP_NAMES = ("pool", "concat", "cls", "patch_mean")
STAGE_TAP = re.compile(r"stage-([1-9][0-9]*)$")


def stage_taps(taps: Sequence[str]) -> list[str]:
    """The stage-N taps among taps, in their order (what concat joins after pool)."""
    return [t for t in taps if STAGE_TAP.match(t)]


def check_tap_names(taps: Sequence[str], key: str = "backbone.taps", error: type = ConfigError) -> None:
    """The names' syntax, before anything is built (the backbone's own names are checked when it is built)."""
    bad = [t for t in taps if not isinstance(t, str) or t not in TAP_NAMES and not STAGE_TAP.match(t)]
    if bad:
        raise error(f"{key} {bad} unknown; use pool, stage-1, stage-2, ... (counted from the last stage), "
                    "concat, and for ViTs cls or patch_mean")
