"""Fleet rollouts gated on measured model metrics: canary, phased, blue/green, A/B, shadow.

    from cloud.rollouts import RolloutService, load_policy
    service = RolloutService(store, desired_states, registry)
    service.start("mlp@2.0.0", "canary", "env=prod", policy=load_policy("configs/rollouts/canary.yaml"),
                  actor="ana")

Private modules: ``_policy`` (YAML policies), ``_targeting`` (selectors, consistent
buckets), ``_machine`` (the transition table), ``_stats`` (numpy statistics), ``_gates``
(verdicts with evidence), ``_repo`` (rows of migration 5), ``_service`` (the engine).
"""

from ._gates import CohortSamples, Verdict, evaluate
from ._machine import TRANSITIONS, RolloutEvent, RolloutState
from ._policy import Gate, Policy, load_policy, parse_policy
from ._service import RolloutService
from ._targeting import bucket, parse_selector

__all__ = [
    "TRANSITIONS", "CohortSamples", "Gate", "Policy", "RolloutEvent", "RolloutService", "RolloutState", "Verdict",
    "bucket", "evaluate", "load_policy", "parse_policy", "parse_selector",
]
