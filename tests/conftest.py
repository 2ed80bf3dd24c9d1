import pyro
import pytest


@pytest.fixture(autouse=True)
def fresh_pyro():
    """Each test starts with an empty param store, validation on and a fixed seed."""
    pyro.clear_param_store()
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


def pytest_configure(config):
    # The models under test are small: one intra-op thread is as fast, and it
    # keeps the suite from oversubscribing a shared CI machine's cores.
    import torch

    torch.set_num_threads(1)
