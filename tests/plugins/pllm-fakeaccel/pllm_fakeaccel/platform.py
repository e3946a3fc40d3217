"""The fake accelerator: the CPU platform under another name, with a
detection score tests can steer through ``PLLM_FAKEACCEL_SCORE``."""

from __future__ import annotations

import os

from pllm.core.interfaces import Detection
from pllm.platforms.cpu.platform import CPUPlatform

SCORE_ENV = "PLLM_FAKEACCEL_SCORE"
DEFAULT_SCORE = 1  # available, but below cpu: installing it changes no auto selection


class FakeAccelPlatform(CPUPlatform):
    name = "fakeaccel"

    @classmethod
    def detect(cls) -> Detection:
        raw = os.environ.get(SCORE_ENV)
        if raw is None:
            return Detection(DEFAULT_SCORE, f"fake accelerator on the host ({SCORE_ENV} unset)")
        score = int(raw)
        if score == 0:
            return Detection(0, f"disabled by {SCORE_ENV}=0")
        return Detection(score, f"fake accelerator on the host ({SCORE_ENV}={score})")
