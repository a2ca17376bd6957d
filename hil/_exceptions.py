"""Errors of the HIL rig, one tree.

    HilError
    ├── ScenarioError   a scenario file is missing or invalid (names the key)
    ├── RigError        the rig could not set up or drive the device under test
    └── TargetError     a target is unknown or unreachable (ssh, scp failed)
"""

from __future__ import annotations


class HilError(Exception):
    """Root of the HIL rig's errors."""


class ScenarioError(HilError):
    """A scenario file is missing, not YAML, or fails validation."""


class RigError(HilError):
    """The rig could not set up or drive the device under test."""


class TargetError(HilError):
    """A target is unknown, or a remote command failed."""
