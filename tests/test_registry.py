"""The plugin registry, with real importlib.metadata: third parties are simulated by writing dist-info
folders (METADATA + entry_points.txt) and their modules into a temporary site directory on sys.path."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lolcats_cli import api
from lolcats_cli.core import registry
from lolcats_cli.errors import ConfigError, PluginError

GOOD_MAP = """
from lolcats_cli.api import FeatureMap

class Good(FeatureMap):
    plugin_api_version = {api}

    @property
    def feature_dim(self):
        return self.head_dim

    def forward(self, x):
        return x.abs()

def not_a_class():
    pass
"""


class Site:
    """A temporary site directory to install fake distributions into."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def add(self, dist: str, module: str, code: str, entry_points: dict[str, dict[str, str]]) -> None:
        """Write distribution ``dist`` 1.2.3 with ``module``.py and the given {group: {name: target}}."""
        info = self.root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
        sections = [f"[{group}]\n" + "".join(f"{n} = {t}\n" for n, t in eps.items())
                    for group, eps in entry_points.items()]
        (info / "entry_points.txt").write_text("\n".join(sections))
        (self.root / f"{module}.py").write_text(textwrap.dedent(code))
        registry.refresh()


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    before = set(sys.modules)
    registry.refresh()
    yield Site(tmp_path)
    for name in set(sys.modules) - before:
        if name.startswith("fake_"):
            del sys.modules[name]
    registry.refresh()


FM = "lolcats.feature_maps"


def test_group_names_match_the_api() -> None:
    assert registry.GROUPS == {"feature_map": api.FEATURE_MAP_GROUP, "window": api.WINDOW_GROUP}


def test_builtins_are_listed_from_entry_points() -> None:
    names = {(p.kind, p.name) for p in registry.list_plugins() if p.distribution == "lolcats"}
    want = {("feature_map", n) for n in ("hedgehog", "elu", "taylor", "t2r")}
    assert want | {("window", n) for n in ("sliding", "terrace", "none")} <= names


def test_listing_imports_no_plugin_code(site: Site) -> None:
    site.add("fake-broken", "fake_broken", "raise RuntimeError('imported!')", {FM: {"broken_map": "fake_broken:X"}})
    info = next(p for p in registry.list_plugins("feature_map") if p.name == "broken_map")
    assert (info.distribution, info.version, info.target) == ("fake-broken", "1.2.3", "fake_broken:X")
    assert "fake_broken" not in sys.modules


def test_listing_imports_neither_torch_nor_builtins() -> None:
    code = ("import sys; from lolcats_cli.core.registry import list_plugins; list_plugins(); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('lolcats_cli.builtins')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unknown_name_suggests_and_lists() -> None:
    with pytest.raises(PluginError) as err:
        registry.get_feature_map("hedgehogg")
    assert "did you mean 'hedgehog'?" in err.value.message
    assert "available:" in err.value.message and "taylor" in err.value.message
    with pytest.raises(PluginError, match="unknown window 'slidin'; did you mean 'sliding'"):
        registry.build_window("slidin")


def test_third_party_plugin_loads_and_builds(site: Site) -> None:
    code = GOOD_MAP.format(api=api.PLUGIN_API_VERSION)
    site.add("fake-good", "fake_good", code, {FM: {"good_map": "fake_good:Good"}})
    fm = registry.build_feature_map("good_map", num_heads=2, head_dim=8)
    assert type(fm).__name__ == "Good" and fm.feature_dim == 8
    assert registry.get_feature_map("good_map") is type(fm)  # cached


def test_two_distributions_claiming_one_name_is_an_error(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    code = GOOD_MAP.format(api=api.PLUGIN_API_VERSION)
    site.add("fake-alpha", "fake_alpha", code, {FM: {"twin": "fake_alpha:Good"}})
    site.add("fake-beta", "fake_beta", code, {FM: {"twin": "fake_beta:Good"}})
    with pytest.raises(PluginError) as err:
        registry.list_plugins()
    assert "'twin'" in err.value.message
    assert "fake-alpha" in err.value.message and "fake-beta" in err.value.message
    assert registry.ENV_VAR in (err.value.hint or "")
    monkeypatch.setenv(registry.ENV_VAR, "fake_Beta")  # names are normalised
    assert registry.get_feature_map("twin").__module__ == "fake_beta"


def test_clash_with_a_builtin_is_an_error(site: Site) -> None:
    site.add("fake-rogue", "fake_rogue", "", {FM: {"hedgehog": "fake_rogue:X"}})
    with pytest.raises(PluginError, match="'lolcats'.*'fake-rogue'|'fake-rogue'.*'lolcats'"):
        registry.get_feature_map("hedgehog")


def test_broken_plugin_is_one_line_naming_its_distribution(site: Site) -> None:
    site.add("fake-boom", "fake_boom", "raise RuntimeError('boom')", {FM: {"boom": "fake_boom:Map"}})
    with pytest.raises(PluginError) as err:
        registry.get_feature_map("boom")
    msg = err.value.message
    assert "\n" not in msg and "Traceback" not in msg
    for part in ("'fake-boom'", "boom = fake_boom:Map", "RuntimeError: boom"):
        assert part in msg


def test_wrong_object_and_wrong_api_version(site: Site) -> None:
    site.add("fake-odd", "fake_odd", GOOD_MAP.format(api=99),
             {FM: {"func": "fake_odd:not_a_class", "future": "fake_odd:Good"},
              "lolcats.windows": {"mapwin": "fake_odd:Good"}})
    with pytest.raises(PluginError, match="not a subclass of lolcats_cli.api.FeatureMap"):
        registry.get_feature_map("func")
    with pytest.raises(PluginError, match="not a subclass of lolcats_cli.api.Window"):
        registry.get_window("mapwin")
    with pytest.raises(PluginError, match=f"plugin API v99; this lolcats speaks v{api.PLUGIN_API_VERSION}"):
        registry.get_feature_map("future")


def test_env_var_limits_distributions(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    code = GOOD_MAP.format(api=api.PLUGIN_API_VERSION)
    site.add("fake-one", "fake_one", code, {FM: {"one": "fake_one:Good"}})
    site.add("fake-two", "fake_two", code, {FM: {"two": "fake_two:Good"}})

    def names() -> set[str]:
        return {p.name for p in registry.list_plugins("feature_map")}

    assert {"one", "two", "hedgehog"} <= names()
    monkeypatch.setenv(registry.ENV_VAR, "")
    assert {p.distribution for p in registry.list_plugins()} == {"lolcats"}
    with pytest.raises(PluginError, match="'fake-one', which LOLCATS_PLUGINS='' leaves out") as err:
        registry.get_feature_map("one")
    assert "add fake-one to LOLCATS_PLUGINS" in (err.value.hint or "")
    monkeypatch.setenv(registry.ENV_VAR, " fake-two , nothing-else")
    assert "two" in names() and "one" not in names() and "hedgehog" in names()


# ------------------------------------------------------------------------------------------ parameters


def test_params_coerce_losslessly() -> None:
    cls = registry.get_feature_map("hedgehog")
    p = registry.build_params(cls, {"feature_dim": "32", "eps": "1e-6"}, "fm")
    assert (p.feature_dim, p.eps) == (32, 1e-6)
    assert registry.build_params(cls, {"feature_dim": 16.0}, "fm").feature_dim == 16
    assert registry.build_params(cls, None, "fm") == cls.Params()
    assert registry.build_params(cls, cls.Params(feature_dim=8), "fm").feature_dim == 8


def test_params_collect_every_problem() -> None:
    with pytest.raises(ConfigError) as err:
        registry.build_feature_map("hedgehog", 4, 16, {"feature_dm": 8, "eps": "tiny", "feature_dim": True})
    problems = err.value.errors
    assert len(problems) == 3
    assert problems[0] == ("attention.feature_map_params.feature_dm: unknown parameter of Hedgehog; "
                           "did you mean 'feature_dim'? valid: feature_dim, eps")
    assert problems[1] == "attention.feature_map_params.eps: expected float, got str 'tiny'"
    assert problems[2] == "attention.feature_map_params.feature_dim: expected int, got bool True"
    assert "feature_dim: int = 64" in (err.value.hint or "")
    assert err.value.exit_code == 2


@pytest.mark.parametrize("value", [6.5, "6.5", [64]])
def test_params_refuse_lossy_values(value: object) -> None:
    with pytest.raises(ConfigError, match=r"attention.feature_map_params.feature_dim: expected int"):
        registry.build_feature_map("hedgehog", 4, 16, {"feature_dim": value})


@pytest.mark.parametrize("size", [0, -3])
def test_window_size_must_be_positive(size: int) -> None:
    with pytest.raises(ConfigError) as err:
        registry.build_window("sliding", {"size": size}, where="attention.window_params")
    assert err.value.errors == [f"attention.window_params.size: must be a positive integer (got {size}); "
                                "the paper uses 64"]


def test_range_errors_come_with_type_errors() -> None:
    with pytest.raises(ConfigError) as err:
        registry.build_feature_map("hedgehog", 4, 16, {"feature_dim": -1, "eps": "x"}, where="fm")
    assert [e.split(":")[0] for e in err.value.errors] == ["fm.eps", "fm.feature_dim"]


def test_params_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match=r"^w: expected a mapping of parameters, got list"):
        registry.build_window("terrace", [64], where="w")
