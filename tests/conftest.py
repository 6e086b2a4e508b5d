"""Test-wide setup: 8 simulated CPU devices (tests pick 1, 2 or 8 of them), absl flags parsed."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags

# Grain reads absl flags; mark them parsed so library code works under pytest.
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
