import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module: its matrices are small, and on a shared
    2-core machine two threads ran such files about 8x slower (oversubscription).  It
    also fixes the float summation order, so near-tie roundings are reproducible."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)
