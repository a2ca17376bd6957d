"""The rollout lifecycle as one transition table (like :mod:`edgeml.updates._machine`).

    pending_approval ──approve──► running ──gates pass──► promoting ──deployed──► running (step n+1)
          │                        │  │ last step done / flip
          │ abort                  │  └──────────────────────► completed ──rollback──► rolling_back
          ▼                        │ gates fail (on_fail: rollback) / rollback                │
       aborted ◄──abort── paused ◄─┤ pause, gates fail (on_fail: pause)                       ▼
                            └─resume─► running                                           rolled_back

``promoting`` and ``rolling_back`` are persisted *before* desired states are written and
left only when every device of the step has its document: a coordinator that stops in
the middle resumes there on the next tick (each deploy is idempotent). ``running`` with
a policy that wants approval before 100 % goes back to ``pending_approval`` first.
"""

from __future__ import annotations

import enum


class RolloutState(enum.StrEnum):
    PENDING_APPROVAL = "pending_approval"
    RUNNING = "running"
    PROMOTING = "promoting"
    PAUSED = "paused"
    ROLLING_BACK = "rolling_back"
    COMPLETED = "completed"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"


class RolloutEvent(enum.StrEnum):
    APPROVE = "approve"
    PROMOTE = "promote"  # gates passed, or a person promoted: the next step starts
    NEED_APPROVAL = "need_approval"
    DEPLOYED = "deployed"  # every document of the step was written
    FINISH = "finish"  # the last step is done (or a blue/green flip)
    FAIL = "fail"  # gates failed and the policy rolls back
    ROLLBACK = "rollback"  # a person asked for it
    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"


S, E = RolloutState, RolloutEvent

#: (state, event) -> next state. Nothing else moves a rollout.
TRANSITIONS: dict[tuple[RolloutState, RolloutEvent], RolloutState] = {
    (S.PENDING_APPROVAL, E.APPROVE): S.PROMOTING,
    (S.PENDING_APPROVAL, E.ABORT): S.ABORTED,
    (S.PENDING_APPROVAL, E.ROLLBACK): S.ROLLING_BACK,
    (S.RUNNING, E.PROMOTE): S.PROMOTING,
    (S.RUNNING, E.NEED_APPROVAL): S.PENDING_APPROVAL,
    (S.RUNNING, E.FINISH): S.COMPLETED,
    (S.RUNNING, E.FAIL): S.ROLLING_BACK,
    (S.RUNNING, E.ROLLBACK): S.ROLLING_BACK,
    (S.RUNNING, E.PAUSE): S.PAUSED,
    (S.RUNNING, E.ABORT): S.ABORTED,
    (S.PROMOTING, E.DEPLOYED): S.RUNNING,
    (S.PROMOTING, E.PAUSE): S.PAUSED,
    (S.PROMOTING, E.ABORT): S.ABORTED,
    (S.PAUSED, E.RESUME): S.RUNNING,
    (S.PAUSED, E.PROMOTE): S.PROMOTING,
    (S.PAUSED, E.ROLLBACK): S.ROLLING_BACK,
    (S.PAUSED, E.ABORT): S.ABORTED,
    (S.ROLLING_BACK, E.DEPLOYED): S.ROLLED_BACK,
    (S.COMPLETED, E.ROLLBACK): S.ROLLING_BACK,  # blue/green flip-back, or undo a finished rollout
}

#: States a rollout never leaves on its own.
FINAL: frozenset[RolloutState] = frozenset({S.ROLLED_BACK, S.ABORTED})
#: States the engine's tick works on.
ACTIVE: frozenset[RolloutState] = frozenset({S.RUNNING, S.PROMOTING, S.ROLLING_BACK})


def next_state(state: RolloutState, event: RolloutEvent) -> RolloutState | None:
    return TRANSITIONS.get((state, event))
