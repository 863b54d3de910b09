"""Fixtures shared by the analysis tests."""
import pytest
import torch.distributed as dist


@pytest.fixture
def one_rank(tmp_path):
    """A one-process gloo group: FSDP2 runs its real code path on a single rank."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous1'}", rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
