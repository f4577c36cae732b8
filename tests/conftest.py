"""Shared test settings."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # The test problems are tiny: thread start-up and contention on a 2-core CI machine
    # cost far more than they save (dense references ran 10-50x slower with 2 threads).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    """Skip tests marked ``gpu`` where CUDA is not available (CI has no GPU)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Hypothesis profiles (tests/operators/test_properties.py): "dev" by default, a few examples
# per property to keep the default run quick; "ci" where the CI environment variable is set,
# several times more. Both derandomized (examples are a function of the test, so a failure
# reproduces on every machine) and without an example database; print_blob prints the
# @reproduce_failure line of a falsifying example. deadline=None: an example builds dense
# references, whose run time varies with the drawn sizes and the machine's load.
# HYPOTHESIS_PROFILE=dev|ci|explore overrides the choice; "explore" draws new random examples
# on every run (hypothesis prints the seed of a failure: rerun with --hypothesis-seed=N).
settings.register_profile(
    "dev",
    max_examples=10,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("ci", parent=settings.get_profile("dev"), max_examples=40)
settings.register_profile("explore", parent=settings.get_profile("dev"), max_examples=200, derandomize=False)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE")
    or ("ci" if os.environ.get("CI", "").lower() not in ("", "0", "false", "no") else "dev")
)
