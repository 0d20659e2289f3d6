"""Hypothesis profiles of the reliability suite: `ci` (the default: fast) and `stress` (thousands
of examples; `make stress`, or HYPOTHESIS_PROFILE=stress)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

from tests.helpers import FUZZ_EXAMPLES

settings.register_profile(
    "ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile(
    "stress",
    max_examples=FUZZ_EXAMPLES["stress"],
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
if "HYPOTHESIS_PROFILE" in os.environ:
    settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])
