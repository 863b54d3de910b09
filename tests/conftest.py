"""Test-session settings: one intra-op thread per process (the tiny test models gain nothing from
more, and spawned gloo ranks would oversubscribe the cores)."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
