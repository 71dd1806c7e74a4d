"""Oríon 0.2.7's own tests, run with orion_tools' replacements installed and without: the same outcomes.

Oríon's PyPI sdist ships its test tree; this fetches it from the registry (cached for the session)
and runs its tests of what a replacement touches, with the project's installed Oríon. Here: warm
starting from a knowledge base, which `produce_within_budget` once dropped (an experiment given a
knowledge base was silently not warm-started). With numpy 2, one of those tests fails in both modes
(Oríon's one-hot transform: `can only concatenate tuple (not "list") to tuple`): a difference is
what fails here, not a failure.
"""

import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest

from conftest import REPO_ROOT, clean_env

ORION_TESTS = ["tests/unittests/core/worker/warm_start/test_multi_task.py"]
# A pytest plugin that installs every replacement before Oríon's tests import anything.
PLUGIN = "from orion_tools import patches\npatches.install(patches.DATABASE + patches.WORKER)\n"


@pytest.fixture(scope="session")
def orion_sdist(tmp_path_factory):
    folder = tmp_path_factory.mktemp("orion-sdist")
    # The machine's pip (the project's environment, made by uv, has none), with its index settings.
    outside = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                              if not p.startswith(str(REPO_ROOT)) and ".venv" not in p)
    pip = shutil.which("pip3", path=outside) or shutil.which("pip", path=outside)
    fetched = subprocess.run([pip, "download", "--quiet", "--no-deps", "--no-binary", ":all:", "orion==0.2.7", "-d",
                              str(folder)], capture_output=True, text=True, timeout=600) if pip else None
    if fetched is None or fetched.returncode != 0:
        why = fetched.stderr.strip()[-500:] if fetched else "no pip outside the project's environment"
        message = f"cannot fetch Oríon 0.2.7's sdist from the package registry: {why}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    [archive] = folder.glob("orion-0.2.7.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    (folder / "plugin").mkdir()
    (folder / "plugin" / "orion_tools_patched.py").write_text(PLUGIN)
    return folder


def outcomes(sdist, patched: bool) -> dict[str, str]:
    """{test id: passed/failed/...} of Oríon's own tests, run in a process of their own."""
    plugins = ["-p", "orion_tools_patched"] if patched else []
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-p", "no:xdist", "--noconftest",
         "-W", "ignore", *plugins, *ORION_TESTS], cwd=sdist / "orion-0.2.7", capture_output=True, text=True,
        timeout=600, env=clean_env(PYTHONPATH=f"{sdist / 'plugin'}:{REPO_ROOT}"))
    found = dict(re.findall(r"^(PASSED|FAILED|ERROR|SKIPPED) (\S+)", result.stdout, re.M))
    return {test: status for status, test in
            re.findall(r"^(PASSED|FAILED|ERROR|SKIPPED) (\S+)", result.stdout, re.M)} if found else {"": result.stdout}


def test_orions_warm_start_tests_have_the_same_outcomes_with_and_without_the_replacements(orion_sdist):
    without, with_ = outcomes(orion_sdist, patched=False), outcomes(orion_sdist, patched=True)
    assert len(without) > 10, without  # The tests ran.
    assert with_ == without
    assert without[f"{ORION_TESTS[0]}::TestMultiTaskWrapper::test_with_warmstarteable_algo"] == "PASSED"
