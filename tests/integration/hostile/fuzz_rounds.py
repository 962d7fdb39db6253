"""What a fuzz test runs: CI's one fixed round, or the long mode's rounds (README).

TLSPROXY_FUZZ_SECONDS=N runs rounds with new seeds for N seconds; TLSPROXY_FUZZ_SEED=S replays
one seed (the seed of a failure is in its message).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator

# The long mode's length (0: CI's fixed round); tests raise their timeout by it.
LONG_SECONDS = float(os.environ.get("TLSPROXY_FUZZ_SECONDS") or 0)


def rounds(ci_seed: int, ci_inputs: int) -> Iterator[tuple[int, int, float]]:
    """(seed, inputs, seconds) of each round to run."""
    if seed := os.environ.get("TLSPROXY_FUZZ_SEED"):
        yield int(seed), ci_inputs, 3600.0
        return
    if not LONG_SECONDS:
        yield ci_seed, ci_inputs, 600.0
        return
    end = time.monotonic() + LONG_SECONDS
    while (left := end - time.monotonic()) > 0:
        yield random.randrange(2**32), 10**9, left
