import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    # One thread: the suite shares 2 cores with other work, where 2 threads thrash.
    torch.set_num_threads(1)
