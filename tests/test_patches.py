"""docs/orion-patches.md, orion_tools/patches.py and what `patches.install` really changes in Oríon agree.

The next maintainer reads the table to learn what to port to another Oríon version: a replacement
installed without a row, or a row that nothing installs, fails here. Run in a process of its own:
installing the patches changes Oríon for the rest of the process."""

import re
import subprocess
import sys

from conftest import REPO_ROOT

TABLE = REPO_ROOT / "docs" / "orion-patches.md"

# Snapshots every attribute of every loaded Oríon module and of each class in them, installs one
# list of patches, and prints the `module.Class.attribute` names that changed, one per line.
CHANGED_BY_INSTALL = """
import sys, types
import orion_tools
from orion_tools import patches

def snapshot():
    seen = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("orion.") or not isinstance(module, types.ModuleType):
            continue
        for attribute, value in list(vars(module).items()):
            seen[f"{name}.{attribute}"] = value
            if isinstance(value, type) and value.__module__ == name:
                for member, member_value in list(vars(value).items()):
                    seen[f"{name}.{value.__qualname__}.{member}"] = member_value
    return seen

before = snapshot()
patches.install(getattr(patches, sys.argv[1]))
after = snapshot()
for key in sorted(after):
    if key not in before or after[key] is not before[key]:
        print(key)
"""


def table_rows() -> list[tuple[str, str]]:
    """(the Oríon attribute, the replacement's module file) of each row of the table."""
    rows = re.findall(r"^\| `(orion\.[\w.]+)` \| ([^|]+) \|", TABLE.read_text(), re.M)
    return [(attribute, replaced_by.strip()) for attribute, replaced_by in rows]


def changed_by_install(group: str) -> list[str]:
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", CHANGED_BY_INSTALL, group], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_every_installed_patch_has_a_row_and_every_row_is_installed():
    installed = changed_by_install("DATABASE") + changed_by_install("WORKER")
    assert sorted(installed) == sorted(attribute for attribute, _ in table_rows())
    assert len(installed) == len(set(installed)) == 24


def test_the_patch_list_names_what_install_changes():
    from orion_tools import patches  # Its targets' names only: nothing is installed here.

    for group in ("DATABASE", "WORKER"):
        assert sorted(p.target for p in getattr(patches, group)) == sorted(changed_by_install(group))


def test_each_row_names_the_module_that_holds_its_replacement():
    from orion_tools import patches

    where = {p.target: p.replacement for p in patches.DATABASE + patches.WORKER}
    previous = None
    for attribute, replaced_by in table_rows():
        if replaced_by == "the same":
            replaced_by = previous
        previous = replaced_by
        replacement = where[attribute]
        function = getattr(replacement, "fget", replacement)  # A property: its getter.
        module = getattr(function, "__module__", None) or "orion_tools.patches"
        assert replaced_by.startswith(f"`orion_tools/{module.split('.')[-1]}.py`"), (attribute, replaced_by, module)


def test_every_test_a_row_names_exists():
    text = TABLE.read_text()
    named = set(re.findall(r"`(?:(test_\w+)\.py::)?(test_\w+)(?:_\*)?`", text))
    sources = {path.stem: path.read_text() for path in (REPO_ROOT / "tests").glob("test_*.py")}
    for module, test in named:
        found = [name for name, source in sources.items() if f"def {test}" in source and (not module or name == module)]
        assert found, f"{module}::{test} named in {TABLE.name} does not exist"
