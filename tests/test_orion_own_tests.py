"""Oríon 0.2.7's own tests, run with orion_tools' replacements installed and without: every
difference is one the replacements mean (tests/orion_own_tests.py, INTENDED_DIFFERENCES).

Oríon's PyPI sdist ships its test tree; tests/orion_own_tests.py fetches it from the registry
(7 s, then cached in ~/.cache/orion-own-tests) and runs its tests of what the replacements touch,
with the project's installed Oríon, once as Oríon ships and once with every replacement of
orion_tools/patches.py as it is when the test runs. The suite runs the script's `quick` group
(about 40 s: the two modes side by side, one pytest process each); the whole check, to run before
changing a replacement, is `uv run tests/orion_own_tests.py` (docs/orion-own-tests.md). With
numpy 2, some of Oríon's tests fail in both modes (its one-hot transform): a difference is what
fails here, not a failure.
"""

import os

import pytest

import orion_own_tests as own


@pytest.fixture(scope="session")
def orion_sdist():
    """(Oríon's extracted sdist, pytest-mock's folder), fetched once into the cache."""
    try:
        return own.fetch(own.DEFAULT_CACHE)
    except own.Unavailable as why:
        message = f"cannot fetch Oríon 0.2.7's own tests from the package registry: {why}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def test_orions_warm_start_tests_have_the_same_outcomes_with_and_without_the_replacements(orion_sdist, tmp_path):
    """And every other difference in the `quick` group is listed. (Its first name, which
    docs/orion-patches.md and conftest.py's SLOW_TESTS name, from when it ran the warm-start tests only.)"""
    sdist, site = orion_sdist
    [result] = own.check(sdist, site, {"quick": own.GROUPS["quick"]}, tmp_path)
    summary = "\n".join(result.summary())
    assert not result.surprises, "\n".join([*result.surprises, "", summary])
    # They ran, with every replacement installed.
    assert len(result.without.outcomes) > 150, summary
    assert result.with_.patches, summary
    # Oríon's warm start is kept (produce_within_budget once dropped it).
    warm_start = ("tests/unittests/core/worker/warm_start/test_multi_task.py::TestMultiTaskWrapper::"
                  "test_with_warmstarteable_algo")
    assert result.without.outcomes[warm_start] == result.with_.outcomes[warm_start] == "passed", summary
