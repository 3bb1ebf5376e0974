"""Finding and reading recipe files: shipped recipes by name, YAML with YAML-1.2 style floats.

Shipped recipes live in the top-level ``recipes/`` folder of the source tree. They are found, in order:

1. as the package ``lolcats_cli.recipes`` — where a wheel (or an editable install) puts them when
   pyproject.toml maps that folder into the package (no symlink, no copy in the tree)::

       [tool.setuptools]
       package-dir = {"" = ".", "lolcats_cli.recipes" = "recipes"}
       [tool.setuptools.package-data]
       "lolcats_cli.recipes" = ["*.yaml"]

   (with ``lolcats_cli.recipes`` added to the package list, see the project's packaging notes);
2. as ``<source checkout>/recipes`` next to the ``lolcats_cli`` folder (editable installs, a plain
   checkout on ``PYTHONPATH``).
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any

import yaml

from ...errors import ConfigError, did_you_mean

RECIPE_SUFFIXES = (".yaml", ".yml")


class RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader with YAML 1.2 scalars: ``1e-3`` is a float (PyYAML's YAML 1.1 needs ``1.0e-3``) and
    only true/false are booleans (not yes/no/on/off, which stay strings)."""


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.VERBOSE,
    ),
    list("-+0123456789."),
)


def recipes_dir() -> Path | None:
    """The folder of shipped recipes (see the module docstring), or None when none is installed."""
    try:
        spec = importlib.util.find_spec("lolcats_cli.recipes")
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        for loc in spec.submodule_search_locations or []:
            if Path(loc).is_dir():
                return Path(loc)
    package = Path(__file__).resolve().parents[2]  # .../lolcats_cli (this file: lolcats_cli/core/recipe/)
    checkout = package.parent
    if (checkout / "recipes").is_dir() and (checkout / "pyproject.toml").is_file():
        return checkout / "recipes"
    return None


def shipped_recipes() -> dict[str, Path]:
    """Shipped recipe names ("llama-3.1-8b", or "sub/name" in subfolders) mapped to their files."""
    root = recipes_dir()
    if root is None:
        return {}
    found = {}
    for path in sorted(root.rglob("*")):
        if path.suffix in RECIPE_SUFFIXES and path.is_file():
            found[path.relative_to(root).with_suffix("").as_posix()] = path
    return found


def resolve_recipe_path(path_or_name: str | os.PathLike[str]) -> Path:
    """A recipe file path, or the file of the shipped recipe with that name."""
    text = os.fspath(path_or_name)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    names = shipped_recipes()
    listing = ", ".join(names) or "none (is lolcats installed with its recipes?)"
    if path.is_dir():
        raise ConfigError(f"recipe {text!r} is a folder, not a YAML file", f"shipped recipes: {listing}")
    looks_like_path = path.suffix in RECIPE_SUFFIXES or "/" in text or os.sep in text
    if not looks_like_path and text in names:
        return names[text]
    stem = path.with_suffix("").name if path.suffix in RECIPE_SUFFIXES else text
    hint = did_you_mean(stem, names)
    what = f"recipe file not found: {text}" if looks_like_path else f"unknown recipe {text!r}"
    raise ConfigError(f"{what}; {hint}shipped recipes: {listing}", "pass a YAML file path or a shipped recipe name")


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The top-level mapping of a YAML recipe file (empty file = {})."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read recipe {os.fspath(path)}: {e}", "check the path and permissions") from e
    try:
        data = yaml.load(text, Loader=RecipeLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{os.fspath(path)}: invalid YAML: {e}", "fix the syntax at the line shown") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{os.fspath(path)}: a recipe must be a mapping of sections (model, attention, data, ...), "
            f"got {type(data).__name__}"
        )
    return data


__all__ = ["RecipeLoader", "recipes_dir", "shipped_recipes", "resolve_recipe_path", "read_yaml"]
