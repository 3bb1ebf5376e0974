"""The plugin registry, with real importlib.metadata: third parties are simulated by writing dist-info
folders (METADATA + entry_points.txt) and their modules into a temporary site directory on sys.path."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from lolcats_cli import api
from lolcats_cli.core.model import registry
from lolcats_cli.errors import ConfigError, PluginError

from plugin_sites import FM, Site  # tests/ is on sys.path (rootdir conftest)

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
    code = ("import sys; from lolcats_cli.core.model.registry import list_plugins; list_plugins(); "
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


def _other_distributions(*leave_out: str) -> list[str]:
    """The third-party distributions with plugins installed here, but ``leave_out``."""
    return sorted({p.distribution for p in registry.list_plugins()} - {"lolcats", *leave_out})


def test_two_distributions_claiming_one_name_fail_only_when_it_is_used(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = GOOD_MAP.format(api=api.PLUGIN_API_VERSION)
    site.add("fake-alpha", "fake_alpha", code, {FM: {"twin": "fake_alpha:Good", "solo": "fake_alpha:Good"}})
    site.add("fake-beta", "fake_beta", code, {FM: {"twin": "fake_beta:Good"}})
    twins = [p for p in registry.list_plugins() if p.name == "twin"]  # listing never raises
    assert {(p.distribution, p.clashes_with) for p in twins} == {("fake-alpha", ("fake-beta",)),
                                                                ("fake-beta", ("fake-alpha",))}
    assert registry.get_feature_map("solo").__module__ == "fake_alpha"  # other names still load
    with pytest.raises(PluginError) as err:
        registry.get_feature_map("twin")
    assert err.value.message == ("feature map 'twin' is registered by 2 distributions: "
                                 "'fake-alpha' (fake_alpha:Good), 'fake-beta' (fake_beta:Good)")
    hint = err.value.hint or ""
    keep = "".join(f",{d}" for d in _other_distributions("fake-alpha", "fake-beta"))  # e.g. the example plugin
    assert f"LOLCATS_PLUGINS=fake-alpha{keep} or LOLCATS_PLUGINS=fake-beta{keep}" in hint
    assert hint.startswith("keep one of fake-alpha, fake-beta") and "pip uninstall lolcats" not in hint
    with pytest.raises(PluginError, match="registered by 2 distributions"):
        registry.find_plugin("twin")
    monkeypatch.setenv(registry.ENV_VAR, "fake_Beta")  # names are normalised
    assert registry.get_feature_map("twin").__module__ == "fake_beta"


def test_clash_with_a_builtin_names_every_distribution_and_the_third_party_one(site: Site) -> None:
    code = GOOD_MAP.format(api=api.PLUGIN_API_VERSION)
    site.add("fake-rogue", "fake_rogue", "",
             {FM: {"hedgehog": "fake_rogue:X"}, "lolcats.windows": {"sliding": "fake_rogue:Y"}})
    site.add("fake-copycat", "fake_copycat", "", {FM: {"hedgehog": "fake_copycat:X"}})
    site.add("fake-good", "fake_good", code, {FM: {"good_map": "fake_good:Good"}})
    assert registry.get_feature_map("elu").__module__ == "lolcats_cli.builtins.feature_maps"  # unaffected
    assert {p.name for p in registry.list_plugins() if p.clashes_with} == {"hedgehog", "sliding"}
    assert [e.message.split(" is ")[0] for e in registry.clashes()] == ["feature map 'hedgehog'", "window 'sliding'"]
    with pytest.raises(PluginError) as err:
        registry.get_feature_map("hedgehog")
    assert err.value.message == ("feature map 'hedgehog' is registered by 3 distributions: 'lolcats' "
                                 "(lolcats_cli.builtins.feature_maps:Hedgehog), 'fake-copycat' (fake_copycat:X), "
                                 "'fake-rogue' (fake_rogue:X)")
    keep = ",".join(_other_distributions("fake-rogue", "fake-copycat"))
    assert err.value.hint == ("'hedgehog' is a built-in feature map; uninstall fake-copycat and fake-rogue "
                              f"(pip uninstall fake-copycat fake-rogue), or leave them out with LOLCATS_PLUGINS={keep}")
    assert "fake-good" in keep
    with pytest.raises(PluginError) as err:
        registry.get_window("sliding")
    assert "pip uninstall fake-rogue)" in (err.value.hint or "")
    assert f"LOLCATS_PLUGINS={','.join(_other_distributions('fake-rogue'))}" in (err.value.hint or "")


def test_plugins_command_lists_clashes_and_other_commands_work(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    from lolcats_cli.cli.main import main

    site.add("fake-rogue", "fake_rogue", "", {FM: {"hedgehog": "fake_rogue:X"}})
    with pytest.raises(SystemExit) as exit_:
        main(["plugins"])
    out, err = capsys.readouterr()
    assert exit_.value.code == 0, err
    assert "also registered by fake-rogue" in out and "also registered by lolcats" in out
    assert "feature map 'hedgehog' is registered by 2 distributions" in err and "pip uninstall fake-rogue" in err
    with pytest.raises(SystemExit) as exit_:
        main(["plugins", "--json", "--kind", "feature_map"])
    rows = [r for r in json.loads(capsys.readouterr().out) if r["name"] == "hedgehog"]
    assert [(r["distribution"], r["clashes_with"]) for r in rows] == [("lolcats", ["fake-rogue"]),
                                                                     ("fake-rogue", ["lolcats"])]
    with pytest.raises(SystemExit) as exit_:
        main(["plugins", "elu", "--json"])  # a name nobody else registers still works
    assert exit_.value.code == 0 and json.loads(capsys.readouterr().out)["name"] == "elu"
    with pytest.raises(SystemExit) as exit_:
        main(["plugins", "hedgehog"])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "fake-rogue" in err and "pip uninstall lolcats" not in err


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


def test_api_version_hint_says_which_side_to_upgrade(site: Site) -> None:
    loads = getattr(api, "COMPATIBLE_PLUGIN_APIS", {api.PLUGIN_API_VERSION})  # the versions this lolcats loads
    newer, older = max(loads) + 1, min(loads) - 1
    site.add("fake-new", "fake_new", GOOD_MAP.format(api=newer), {FM: {"newer": "fake_new:Good"}})
    site.add("fake-old", "fake_old", GOOD_MAP.format(api=older), {FM: {"older": "fake_old:Good"}})
    with pytest.raises(PluginError) as err:
        registry.get_feature_map("newer")
    hint = err.value.hint or ""
    assert hint.startswith(f"upgrade lolcats to a release that speaks plugin API v{newer} (pip install -U lolcats)")
    assert "older release of fake-new" in hint and "upgrade fake-new" not in hint
    with pytest.raises(PluginError) as err:
        registry.get_feature_map("older")
    hint = err.value.hint or ""
    assert hint.startswith(f"upgrade fake-old to a release written for plugin API v{api.PLUGIN_API_VERSION}")
    assert "pip install -U fake-old" in hint and "upgrade lolcats" not in hint


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


def test_env_var_names_nobody_installed_are_warned_about_once(
    site: Site, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    code = GOOD_MAP.format(api=api.PLUGIN_API_VERSION)
    site.add("fake-example-plugin", "fake_example", code, {FM: {"example_map": "fake_example:Good"}})
    monkeypatch.setenv(registry.ENV_VAR, "fake-exmaple-plugin,Fake_Example_Plugin")
    with caplog.at_level(logging.WARNING, logger="lolcats_cli"):
        registry.list_plugins()
        registry.get_feature_map("example_map")  # the correctly spelled one still loads
        registry.find_plugin("hedgehog")
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("lolcats_cli")]
    assert len(warnings) == 1, warnings
    assert "'fake-exmaple-plugin', which matches no installed distribution" in warnings[0]
    assert "did you mean 'fake-example-plugin'?" in warnings[0]
    caplog.clear()
    monkeypatch.setenv(registry.ENV_VAR, "lolcats,fake-example-plugin")  # installed names: no warning
    registry.list_plugins()
    assert [r for r in caplog.records if r.name.startswith("lolcats_cli")] == []


def test_env_var_typo_warns_on_stderr_in_the_cli(
    site: Site, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lolcats_cli.cli.main import main

    site.add("fake-two", "fake_two", GOOD_MAP.format(api=api.PLUGIN_API_VERSION), {FM: {"two": "fake_two:Good"}})
    monkeypatch.setenv(registry.ENV_VAR, "fake-tow")
    with pytest.raises(SystemExit) as exit_:
        main(["plugins", "--json"])
    out, err = capsys.readouterr()
    assert exit_.value.code == 0 and {r["distribution"] for r in json.loads(out)} == {"lolcats"}
    assert err.count("warning:") == 1 and "LOLCATS_PLUGINS names 'fake-tow'" in err
    assert "did you mean 'fake-two'?" in err


# ------------------------------------------------------------------------------------------ parameters


def test_params_convert_as_recipe_fields_do() -> None:  # tests/core/recipe/test_typecheck.py: the same verdicts
    cls = registry.get_feature_map("hedgehog")
    p = registry.build_params(cls, {"feature_dim": 32, "eps": 1e-6}, "fm")
    assert (p.feature_dim, p.eps) == (32, 1e-6)
    with pytest.raises(ConfigError) as err:
        registry.build_params(cls, {"feature_dim": "32", "eps": "1e-6"}, "fm")
    assert err.value.errors == ["fm.feature_dim: expected an integer, got '32'; write it without quotes: 32",
                                "fm.eps: expected a number, got '1e-6'; write it without quotes: 1e-6"]
    assert registry.build_params(cls, None, "fm") == cls.Params()
    assert registry.build_params(cls, cls.Params(feature_dim=8), "fm").feature_dim == 8


def test_params_collect_every_problem() -> None:
    with pytest.raises(ConfigError) as err:
        registry.build_feature_map("hedgehog", 4, 16, {"feature_dm": 8, "eps": "tiny", "feature_dim": True})
    problems = err.value.errors
    assert len(problems) == 3
    assert problems[0] == ("attention.feature_map_params.feature_dm: unknown parameter of Hedgehog; "
                           "did you mean 'feature_dim'? valid: feature_dim, eps")
    assert problems[1] == "attention.feature_map_params.eps: expected a number, got 'tiny'"
    assert problems[2] == "attention.feature_map_params.feature_dim: expected an integer, got True"
    assert "feature_dim: int = 64" in (err.value.hint or "")
    assert err.value.exit_code == 2


@pytest.mark.parametrize("value", [6.5, 64.0, "6.5", "64", [64]])
def test_params_refuse_what_is_not_an_integer(value: object) -> None:
    with pytest.raises(ConfigError, match=r"attention.feature_map_params.feature_dim: expected an integer"):
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


ROLE_MAPS = """
import torch
from lolcats_cli.api import FeatureMap

class Calibrated(FeatureMap):  # plugin API v3: takes its role and layer, calibrates from the teacher
    plugin_api_version = 3

    def __init__(self, num_heads, head_dim, params=None, *, role=None, layer_idx=None):
        super().__init__(num_heads, head_dim, params, role=role, layer_idx=layer_idx)
        self.seen_in_init = (role, layer_idx)
        self.register_buffer("scale", torch.ones(()))

    @property
    def feature_dim(self):
        return self.head_dim

    def init_from_teacher(self, attention):
        proj = attention.q_proj if self.role == "q" else attention.k_proj
        self.scale.fill_(float(proj.weight.norm()))

    def forward(self, x):
        return x.abs() * self.scale

class OldStyle(FeatureMap):  # plugin API v2: the old __init__, no role arguments
    plugin_api_version = 2

    def __init__(self, num_heads, head_dim, params=None):
        super().__init__(num_heads, head_dim, params)

    @property
    def feature_dim(self):
        return self.head_dim

    def forward(self, x):
        return x.abs()
"""


def test_feature_maps_learn_their_role_layer_and_teacher(site: Site) -> None:
    import transformers

    from lolcats_cli.core.model.convert import convert_model, linearized_layers

    site.add("fake-roles", "fake_roles", ROLE_MAPS,
             {FM: {"calibrated": "fake_roles:Calibrated", "old_style": "fake_roles:OldStyle"}})
    for name in ("calibrated", "old_style"):
        cfg = transformers.LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                       num_hidden_layers=2, intermediate_size=64, vocab_size=64)
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        teachers = [layer.self_attn for layer in model.model.layers]
        convert_model(model, feature_map=name, window="sliding", window_params={"size": 4})
        for (i, layer), teacher in zip(linearized_layers(model), teachers, strict=True):
            q, k = layer.feature_map_q, layer.feature_map_k
            assert (q.role, q.layer_idx, k.role, k.layer_idx) == ("q", i, "k", i), name
            if name == "calibrated":  # given in __init__, and calibrated from this layer's own projections
                assert (q.seen_in_init, k.seen_in_init) == (("q", i), ("k", i))
                assert q.scale.item() == pytest.approx(teacher.q_proj.weight.norm().item())
                assert k.scale.item() == pytest.approx(teacher.k_proj.weight.norm().item())
                assert q.scale.item() != pytest.approx(k.scale.item())
