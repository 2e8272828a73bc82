"""Test-session settings: torch on one thread.

The tests train tiny models, where torch's intra-op thread pool only costs: on a 2-core CI
machine with another process busy, two torch threads made some modules ten times slower
(44 s instead of 5 s). Results do not depend on it: every comparison runs in this process.
"""

import torch

torch.set_num_threads(1)
