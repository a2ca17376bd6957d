"""Safe model updates: verified download, persisted state machine, atomic A/B switch,
health check, probation and automatic rollback."""

from ._download import UpdateRejected
from ._health import SAMPLES_KEY, encode_samples
from ._machine import TRANSITIONS, Event, State, UpdateRecord, next_state
from ._manager import CRASH_AT_ENV, UpdateManager

__all__ = ["CRASH_AT_ENV", "SAMPLES_KEY", "TRANSITIONS", "Event", "State", "UpdateManager", "UpdateRecord",
           "UpdateRejected", "encode_samples", "next_state"]
