"""A synthetic sensor stream whose drift can be dialed (numpy only: usable on the device side).

    stream = SensorStream(seed=0)              # 8 channels, 3 classes (machine states)
    x, y = stream.sample(256, drift=0.0)       # float32 [256, 8], int64 [256]
    x, y = stream.sample(256, drift=1.0)       # the same physics, drifted sensors

Each class is a point in channel space (``class_means``, fixed by ``seed``) plus unit
Gaussian noise. ``drift`` moves the sensors: every reading is offset by ``drift`` times
``shift`` (the step from state 0's mean to state 1's) and scaled by ``1 + GAIN * drift``
on half of the channels (a calibration that wandered). The labels are the ground truth
of the *physical* state, so a model trained at drift 0 loses accuracy as the drift
grows (at drift 1 state 0 reads where state 1 used to), and a model retrained on
drifted, labeled readings recovers it. ``drift=0`` is the training distribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["GAIN", "SensorStream"]

#: Relative gain change of the drifting channels at ``drift=1``.
GAIN = 0.5


@dataclass(frozen=True)
class SensorStream:
    """Readings of ``features`` channels from a machine in one of ``classes`` states."""

    features: int = 8
    classes: int = 3
    seed: int = 0
    separation: float = 2.0  # distance scale between class means (noise std = 1)
    class_means: np.ndarray = field(init=False, repr=False)
    shift: np.ndarray = field(init=False, repr=False)
    gain_mask: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.features < 1 or self.classes < 2:
            raise ValueError("a sensor stream needs at least one channel and two classes")
        rng = np.random.default_rng([self.seed, 0x5E45])
        object.__setattr__(self, "class_means", rng.normal(0.0, self.separation, (self.classes, self.features)))
        object.__setattr__(self, "shift", self.class_means[1] - self.class_means[0])
        object.__setattr__(self, "gain_mask", (np.arange(self.features) % 2 == 0).astype(np.float64))

    def sample(self, n: int, drift: float = 0.0, rng: np.random.Generator | int | None = None,
               ) -> tuple[np.ndarray, np.ndarray]:
        """``n`` readings and their true states at the given drift."""
        gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        y = gen.integers(0, self.classes, size=n)
        x = self.class_means[y] + gen.standard_normal((n, self.features))
        return self.distort(x, drift).astype(np.float32), y.astype(np.int64)

    def distort(self, x: np.ndarray, drift: float) -> np.ndarray:
        """What drifted sensors read for the true readings ``x``."""
        if drift == 0.0:
            return x
        gain = 1.0 + GAIN * drift * self.gain_mask
        return x * gain + drift * self.shift
