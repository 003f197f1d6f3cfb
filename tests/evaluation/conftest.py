import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def one_intra_op_thread():
    """The evaluation tests run many small ops; on the shared 2-core machine two intra-op threads
    made them ~10x slower than one (measured: classifier training 90 s vs 9 s under load)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
