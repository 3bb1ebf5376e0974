"""One coercion engine: a recipe field and a plugin parameter of the same type give the same verdict on the
same value (``typecheck.convert`` decides both); a quoted number is refused with the fix."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import pytest

from lolcats_cli.api import PluginParams
from lolcats_cli.core.model import registry
from lolcats_cli.core.recipe import typecheck
from lolcats_cli.core.recipe.recipe import load_recipe
from lolcats_cli.core.runs.workspace import check_plugins
from lolcats_cli.errors import ConfigError


@dataclasses.dataclass
class Fields(PluginParams):
    count: int = 1
    rate: float = 1.0
    flag: bool = False
    maybe: int | None = None
    mode: Literal["a", "b"] = "a"
    sizes: list[int] = dataclasses.field(default_factory=list)
    pair: tuple[int, ...] = (1, 2)


class Plugin:  # what build_params needs of a plugin class: its Params
    Params = Fields


CASES: list[tuple[str, Any, Any]] = [  # (field, value written, the value built or the one error)
    ("count", 64, 64),
    ("count", "64", "s.count: expected an integer, got '64'; write it without quotes: 64"),
    ("count", " -3 ", "s.count: expected an integer, got ' -3 '; write it without quotes: -3"),
    ("count", 64.0, "s.count: expected an integer, got 64.0"),
    ("count", True, "s.count: expected an integer, got True"),
    ("count", [64], "s.count: expected an integer, got a list"),
    ("rate", 1, 1.0),
    ("rate", "1e-3", "s.rate: expected a number, got '1e-3'; write it without quotes: 1e-3"),
    ("rate", "fast", "s.rate: expected a number, got 'fast'"),
    ("flag", "True", "s.flag: expected true or false, got 'True'; write it without quotes: true"),
    ("flag", 1, "s.flag: expected true or false, got 1"),
    ("maybe", None, None),
    ("maybe", "20", "s.maybe: expected an integer or null, got '20'; write it without quotes: 20"),
    ("mode", "b", "b"),
    ("mode", "c", "s.mode: invalid choice 'c'; choices: 'a', 'b'"),
    ("sizes", [1, 2], [1, 2]),
    ("sizes", [1, "2"], "s.sizes[1]: expected an integer, got '2'; write it without quotes: 2"),
    ("pair", [3, 4], (3, 4)),
]


def _as_recipe_field(name: str, value: Any) -> Any:
    errors: list[str] = []
    built = typecheck.build(Fields, {name: value}, "s", errors)
    return errors[0] if errors else getattr(built, name)


def _as_plugin_param(name: str, value: Any) -> Any:
    try:
        built = registry.build_params(Plugin, {name: value}, "s")
    except ConfigError as e:
        assert len(e.errors) == 1, e.errors
        return e.errors[0]
    return getattr(built, name)


@pytest.mark.parametrize(("name", "value", "verdict"), CASES, ids=[f"{n}={v!r}" for n, v, _ in CASES])
def test_recipe_fields_and_plugin_params_share_one_verdict(name: str, value: Any, verdict: Any) -> None:
    assert _as_recipe_field(name, value) == verdict
    assert _as_plugin_param(name, value) == verdict
    assert type(_as_plugin_param(name, value)) is type(verdict)  # 1 -> 1.0, [3, 4] -> (3, 4)


def test_a_quoted_number_is_refused_alike_in_a_recipe_and_in_plugin_params(tmp_path) -> None:
    path = tmp_path / "quoted.yaml"
    path.write_text('transfer:\n  max_steps: "20"\n')
    with pytest.raises(ConfigError) as field:
        load_recipe(path)
    path.write_text('attention:\n  window: sliding\n  window_params: {size: "64"}\n')
    with pytest.raises(ConfigError) as param:
        check_plugins(load_recipe(path))  # the recipe only checks that plugin parameters are a mapping
    assert field.value.errors == ["transfer.max_steps: expected an integer or null, got '20'; "
                                  "write it without quotes: 20"]
    assert param.value.errors == ["attention.window_params.size: expected an integer, got '64'; "
                                  "write it without quotes: 64"]


def test_an_annotation_the_engine_does_not_know_is_left_to_its_owner() -> None:
    from collections.abc import Callable

    errors: list[str] = []
    assert typecheck.convert(Callable[[int], int], "anything", "s.f", errors) == "anything" and not errors
