"""Shared test settings: thread count, the ``gpu`` and ``slow`` markers, hypothesis profiles.

Two profiles of one suite (CONTRIBUTING.md, "Tests"):

- the default run (``python -m pytest -q``) skips tests marked ``slow`` (process groups,
  notebooks, subprocess end-to-end runs, compilation, searches whose property a faster test
  also checks) and gives the property-based tests a few random examples;
- ``CI=true`` (what ``.ci/run`` sets) or ``--run-slow`` runs the slow tests too; ``CI=true``
  also gives the property-based tests their longer hypothesis profile.

Tests marked ``gpu`` are skipped where CUDA is not available.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, settings


def _environment_flag(name: str) -> bool:
    """Whether the environment variable ``name`` is set to something other than a false value."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


IN_CI = _environment_flag("CI")


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register ``--run-slow``."""
    parser.addoption(
        "--run-slow",
        action="store_true",
        default=False,
        help="also run the tests marked slow (the default where the CI environment variable is set)",
    )


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    # The test problems are tiny: on a 2-core CI machine thread start-up and contention cost
    # more than the threads save.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _slow_requested(config: pytest.Config) -> bool:
    """``--run-slow``, ``CI=true``, or a ``-m`` expression that names the marker."""
    return bool(config.getoption("--run-slow")) or IN_CI or "slow" in (config.getoption("markexpr") or "")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu`` tests without CUDA, and ``slow`` tests unless asked for."""
    skip_gpu = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA GPU")
    skip_slow = (
        None
        if _slow_requested(config)
        else pytest.mark.skip(reason="slow: run with --run-slow (CI=true runs it)")
    )
    for item in items:
        if skip_gpu is not None and "gpu" in item.keywords:
            item.add_marker(skip_gpu)
        elif skip_slow is not None and "slow" in item.keywords:
            item.add_marker(skip_slow)


# Hypothesis profiles (tests/operators/test_properties.py): "dev" by default, a few random
# examples per property besides the fixed @example problems (which run in every profile), so
# the default run still checks each property on the known hard cases without the cost of a
# search; "ci" where the CI environment variable is set, ten times more. Both derandomized
# (examples are a function of the test, so a failure reproduces on every machine) and without
# an example database; print_blob prints the @reproduce_failure line of a falsifying example.
# deadline=None: an example builds dense references, whose run time varies with the drawn
# sizes and the machine's load.
# HYPOTHESIS_PROFILE=dev|ci|explore overrides the choice; "explore" draws new random examples
# on every run (hypothesis prints the seed of a failure: rerun with --hypothesis-seed=N).
settings.register_profile(
    "dev",
    max_examples=4,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("ci", parent=settings.get_profile("dev"), max_examples=40)
settings.register_profile("explore", parent=settings.get_profile("dev"), max_examples=200, derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if IN_CI else "dev"))
