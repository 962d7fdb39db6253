"""When to restart a worker that exited, and when to give up on it (pure, time passed in).

Rules:
- An exit (or a start that never became ready) within `stable_after` seconds of its start is a
  *quick* exit. Quick exits in a row grow the back-off: base, base x factor, ... up to `cap`.
- A worker that stayed up for `stable_after` or longer has proved it can run: its exit starts
  the count again (the next restart waits only `base`).
- `max_quick_exits` quick exits in a row is a crash loop: the slot is left down (`None`), so one
  broken worker does not burn a core restarting forever while the others keep serving. Only an
  explicit `reset()` (a rolling restart, i.e. a deploy) tries it again.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RestartSettings:
    base: float = 0.5
    factor: float = 2.0
    cap: float = 30.0
    stable_after: float = 10.0
    max_quick_exits: int = 5


@dataclass
class RestartPolicy:
    settings: RestartSettings = field(default_factory=RestartSettings)
    quick_exits: int = 0  # in a row
    gave_up: bool = False

    def on_exit(self, now: float, started_at: float) -> float | None:
        """Record one exit of a worker started at `started_at`; return the delay before the
        next start, or None when this is a crash loop and the slot must stay down."""
        s = self.settings
        if now - started_at >= s.stable_after:
            self.quick_exits = 0
        self.quick_exits += 1
        if self.quick_exits >= s.max_quick_exits:
            self.gave_up = True
            return None
        return min(s.cap, s.base * s.factor ** (self.quick_exits - 1))

    def reset(self) -> None:
        self.quick_exits = 0
        self.gave_up = False
