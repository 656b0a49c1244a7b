"""What `pip install .` (not only -e) ships: every package, the migrations, the templates."""

from pathlib import Path

import tomllib

ROOT = Path(__file__).parent.parent


def test_every_package_of_the_source_tree_is_in_the_wheel_list():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    in_tree = {".".join(p.parent.relative_to(ROOT).parts)
               for p in (ROOT / "labelassist").rglob("__init__.py")}
    assert in_tree - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert {"labelassist._migrations", "labelassist._migrations.versions",
            "labelassist._templates"} <= listed
