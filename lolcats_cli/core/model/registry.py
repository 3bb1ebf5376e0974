"""The plugin registry: feature maps and windows, found by name through entry points.

Entry points are the only source of names: built-ins are registered by the ``lolcats`` distribution in
the same groups (``lolcats.feature_maps``, ``lolcats.windows``) as any third-party plugin. Listing reads
distribution metadata only; a plugin's module is imported the first time its class is asked for.

``LOLCATS_PLUGINS`` (comma-separated distribution names) limits which distributions load; the built-in
``lolcats`` distribution always does, and an empty value means built-ins only. A name in it that matches no
installed distribution is warned about once (on the ``lolcats_cli`` logger), with a did-you-mean.

Two distributions registering one name is not an error until that name is used: the listing shows both
(``PluginInfo.clashes_with``), and loading the name raises a :class:`PluginError` naming every distribution
that registers it.

This module never imports torch at import time, so ``lolcats plugins`` stays fast.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import typing
from collections.abc import Mapping
from importlib.metadata import EntryPoint, distributions, entry_points
from typing import TYPE_CHECKING, Any, Literal

from ...errors import ConfigError, PluginError, did_you_mean
from ..recipe import typecheck

if TYPE_CHECKING:
    from ...api import FeatureMap, PluginParams, Window

Kind = Literal["feature_map", "window"]
# The same strings as lolcats_cli.api.FEATURE_MAP_GROUP / WINDOW_GROUP (api imports torch; this must not).
GROUPS: dict[str, str] = {"feature_map": "lolcats.feature_maps", "window": "lolcats.windows"}
BUILTIN_DISTRIBUTION = "lolcats"
ENV_VAR = "LOLCATS_PLUGINS"
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PluginInfo:
    """One registered plugin, as its distribution's metadata declares it (nothing imported)."""

    kind: Kind
    name: str
    distribution: str
    version: str
    target: str  # "module:attribute"
    clashes_with: tuple[str, ...] = ()  # other distributions registering the same name: using it is an error


def _normalize(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def _allowed_distributions() -> frozenset[str] | None:
    """Normalised names LOLCATS_PLUGINS allows (the built-ins always), or None when it is unset."""
    raw = os.environ.get(ENV_VAR)
    if raw is None:
        return None
    _warn_unknown_distributions(raw)
    names = {_normalize(n.strip()) for n in raw.split(",") if n.strip()}
    return frozenset(names | {BUILTIN_DISTRIBUTION})


@functools.lru_cache(maxsize=None)
def _warn_unknown_distributions(raw: str) -> None:
    """Warn, once per value of LOLCATS_PLUGINS, about each name in it that matches no installed distribution
    (it loads nothing, so a typo would otherwise silently leave only the built-ins)."""
    asked = list(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
    installed = {_normalize(d.name) for d in distributions() if d.name} | {BUILTIN_DISTRIBUTION}
    unknown = [n for n in asked if _normalize(n) not in installed]
    if not unknown:
        return
    providers = sorted({_normalize(_dist_name(ep)) for group in GROUPS.values() for ep in entry_points(group=group)}
                       - {BUILTIN_DISTRIBUTION})
    for name in unknown:
        log.warning(
            f"{ENV_VAR} names {name!r}, which matches no installed distribution, so it loads nothing; "
            f"{did_you_mean(_normalize(name), providers)}distributions with plugins: {', '.join(providers) or '(none)'}"
        )


def _by_builtin_then_name(ep: EntryPoint) -> tuple[bool, str]:
    return _normalize(_dist_name(ep)) != BUILTIN_DISTRIBUTION, _normalize(_dist_name(ep))


@functools.lru_cache(maxsize=None)
def _scan(kind: Kind, allowed: frozenset[str] | None) -> tuple[dict[str, tuple[EntryPoint, ...]], dict[str, str]]:
    """``(registered, excluded)``: name -> its entry points in allowed distributions (one per distribution,
    the built-in first; more than one is a clash, an error only once the name is used), and name ->
    distribution for the ones LOLCATS_PLUGINS leaves out. Never raises: listing must always work."""
    registered: dict[str, list[EntryPoint]] = {}
    excluded: dict[str, str] = {}
    for ep in entry_points(group=GROUPS[kind]):
        dist = _dist_name(ep)
        if allowed is not None and _normalize(dist) not in allowed:
            excluded.setdefault(ep.name, dist)
            continue
        same = registered.setdefault(ep.name, [])
        if all(_normalize(_dist_name(e)) != _normalize(dist) for e in same):
            same.append(ep)
    return {name: tuple(sorted(eps, key=_by_builtin_then_name)) for name, eps in registered.items()}, excluded


def _clash(kind: Kind, name: str, eps: tuple[EntryPoint, ...], allowed: frozenset[str] | None) -> PluginError:
    """The error for a name that several distributions register: every one of them, and which to remove."""
    label = kind.replace("_", " ")
    dists = [_dist_name(ep) for ep in eps]
    listed = ", ".join(f"{d!r} ({ep.value})" for d, ep in zip(dists, eps))
    third = [d for d in dists if _normalize(d) != BUILTIN_DISTRIBUTION]
    # the other third-party distributions with plugins, which the suggested LOLCATS_PLUGINS must keep
    skip = {_normalize(d) for d in dists} | {BUILTIN_DISTRIBUTION}
    kinds: list[Kind] = ["feature_map", "window"]
    others = sorted({_dist_name(ep) for k in kinds for regs in _scan(k, allowed)[0].values() for ep in regs
                     if _normalize(_dist_name(ep)) not in skip})
    if len(third) < len(dists):  # a built-in name: the third-party distribution has to give way
        keep = f"{ENV_VAR}={','.join(others)}" if others else f'{ENV_VAR}="" (the built-ins only)'
        hint = (f"{name!r} is a built-in {label}; uninstall {' and '.join(third)} (pip uninstall {' '.join(third)}), "
                f"or leave {'it' if len(third) == 1 else 'them'} out with {keep}")
    else:
        choices = " or ".join(f"{ENV_VAR}={','.join(sorted([*others, d]))}" for d in third)
        hint = (f"keep one of {', '.join(third)}: uninstall the others (pip uninstall <distribution>), "
                f"or choose one with {choices}")
    return PluginError(f"{label} {name!r} is registered by {len(eps)} distributions: {listed}", hint=hint)


def _dist_name(ep: EntryPoint) -> str:
    return ep.dist.name if ep.dist is not None else "?"


def refresh() -> None:
    """Forget what was scanned and loaded (after installing a plugin in a running process, in tests)."""
    _scan.cache_clear()
    _load.cache_clear()
    _warn_unknown_distributions.cache_clear()


def list_plugins(kind: Kind | None = None) -> list[PluginInfo]:
    """Every registered plugin of ``kind`` (both kinds when None), sorted; imports no plugin code.

    A name several distributions register is listed once per distribution, each with ``clashes_with``
    naming the others; loading such a name raises, listing never does."""
    kinds: list[Kind] = [kind] if kind is not None else ["feature_map", "window"]
    out = []
    for k in kinds:
        if k not in GROUPS:
            raise PluginError(f"unknown plugin kind {k!r}", hint=f"use one of: {', '.join(GROUPS)}")
        registered, _ = _scan(k, _allowed_distributions())
        for name, eps in sorted(registered.items()):
            dists = [_dist_name(ep) for ep in eps]
            for ep, dist in zip(eps, dists):
                version = ep.dist.version if ep.dist is not None else "?"
                out.append(PluginInfo(k, name, dist, version, ep.value, tuple(d for d in dists if d != dist)))
    return out


def clashes(kind: Kind | None = None) -> list[PluginError]:
    """The error each name registered by several distributions raises when used (``kind``: both when None)."""
    allowed = _allowed_distributions()
    kinds: list[Kind] = [kind] if kind is not None else ["feature_map", "window"]
    return [_clash(k, name, eps, allowed) for k in kinds for name, eps in sorted(_scan(k, allowed)[0].items())
            if len(eps) > 1]


@functools.lru_cache(maxsize=None)
def _load(kind: Kind, name: str, allowed: frozenset[str] | None) -> type:
    from ...api import COMPATIBLE_PLUGIN_APIS, PLUGIN_API_VERSION, FeatureMap, Window  # torch: once a plugin loads

    label = kind.replace("_", " ")
    registered, excluded = _scan(kind, allowed)
    if name not in registered:
        raise _unknown(label, name, list(registered), excluded)
    if len(registered[name]) > 1:
        raise _clash(kind, name, registered[name], allowed)
    ep = registered[name][0]
    where = f"{label} {name!r} (entry point {ep.name} = {ep.value} in distribution {_dist_name(ep)!r})"
    try:
        obj = ep.load()
    except Exception as exc:  # a broken plugin must not take the CLI down with a traceback
        raise PluginError(
            f"{where} failed to import: {type(exc).__name__}: {exc}".replace("\n", " "),
            hint=f"reinstall or upgrade {_dist_name(ep)}, or skip it with {ENV_VAR}=<other distributions>",
        ) from exc
    base = FeatureMap if kind == "feature_map" else Window
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise PluginError(
            f"{where} is {obj!r}, not a subclass of lolcats_cli.api.{base.__name__}",
            hint=f"point the entry point at a class deriving from lolcats_cli.api.{base.__name__}",
        )
    declared = getattr(obj, "plugin_api_version", PLUGIN_API_VERSION)
    if declared not in COMPATIBLE_PLUGIN_APIS:  # older versions this lolcats still loads are listed there
        dist = _dist_name(ep)
        if isinstance(declared, int) and declared > PLUGIN_API_VERSION:  # the plugin is newer than this lolcats
            hint = (f"upgrade lolcats to a release that speaks plugin API v{declared} (pip install -U lolcats), "
                    f"or install an older release of {dist} written for v{PLUGIN_API_VERSION}")
        else:  # the plugin was written for an older API
            hint = (f"upgrade {dist} to a release written for plugin API v{PLUGIN_API_VERSION} "
                    f"(pip install -U {dist}), or install a lolcats release that speaks v{declared}")
        raise PluginError(
            f"{where} was written for plugin API v{declared}; this lolcats speaks v{PLUGIN_API_VERSION}",
            hint=hint,
        )
    return obj


def _unknown(label: str, name: str, names: list[str], excluded: dict[str, str]) -> PluginError:
    """The error for a name nobody registered (or that LOLCATS_PLUGINS leaves out)."""
    if name in excluded:
        return PluginError(
            f"{label} {name!r} comes from distribution {excluded[name]!r}, which {ENV_VAR}="
            f"{os.environ.get(ENV_VAR, '')!r} leaves out",
            hint=f"add {excluded[name]} to {ENV_VAR}, or unset it to load every installed plugin",
        )
    return PluginError(
        f"unknown {label} {name!r}; {did_you_mean(name, names)}available: {', '.join(sorted(names)) or '(none)'}",
        hint="`lolcats plugins` lists what is installed; a third-party one needs `pip install <its distribution>`",
    )


def find_plugin(name: str, kind: Kind | None = None) -> PluginInfo:
    """The listing entry of ``name`` (searching both kinds when ``kind`` is None); imports nothing.
    A name several distributions register raises the clash error."""
    infos = list_plugins(kind)
    for info in infos:
        if info.name == name:
            if info.clashes_with:
                allowed = _allowed_distributions()
                raise _clash(info.kind, name, _scan(info.kind, allowed)[0][name], allowed)
            return info
    excluded: dict[str, str] = {}
    for k in [kind] if kind else list(GROUPS):
        excluded.update(_scan(k, _allowed_distributions())[1])  # type: ignore[arg-type]
    label = kind.replace("_", " ") if kind else "plugin"
    raise _unknown(label, name, [i.name for i in infos], excluded)


def load(kind: Kind, name: str) -> type:
    """The class registered as ``name`` in ``kind``'s group (imported on first use, then cached)."""
    return _load(kind, name, _allowed_distributions())


def get_feature_map(name: str) -> type[FeatureMap]:
    """The feature-map class registered as ``name`` (imported on first use, then cached)."""
    return _load("feature_map", name, _allowed_distributions())


def get_window(name: str) -> type[Window]:
    """The window class registered as ``name`` (imported on first use, then cached)."""
    return _load("window", name, _allowed_distributions())


# ------------------------------------------------------------------------------------------ parameters


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _prefixed(where: str, message: str, fields: list[str]) -> str:
    """``where.field: rest`` when the message starts with a field name, else ``where: message``."""
    head, _, rest = message.partition(" ")
    return f"{where}.{head}: {rest}" if head in fields and rest else f"{where}: {message}"


def build_params(cls: type, values: Mapping[str, Any] | PluginParams | None, where: str) -> PluginParams:
    """``cls.Params`` from a mapping, with every problem collected into one :class:`ConfigError`.

    Checks unknown keys (with a suggestion), types (by :func:`lolcats_cli.core.recipe.typecheck.convert`, the
    rules of recipe fields: ``"64"`` is a quoted number, not 64; an int widens to a float), then the
    plugin's own ``Params.errors()`` on the values that passed. Messages are prefixed by ``where``
    (``attention.feature_map_params.feature_dim: ...``).
    """
    params_cls = cls.Params
    if isinstance(values, params_cls):
        good, problems = {f.name: getattr(values, f.name) for f in dataclasses.fields(values) if f.init}, []
    elif values is None or isinstance(values, Mapping):
        good, problems = _check_fields(cls, values or {}, where)
    else:
        raise ConfigError(f"{where}: expected a mapping of parameters, got {type(values).__name__} {values!r}",
                          hint=f"parameters of {cls.__name__}: {describe_params(cls)}")
    names = [f.name for f in dataclasses.fields(params_cls) if f.init]
    try:
        built = params_cls(**{k: v for k, v in good.items() if k in names})
    except TypeError:  # a required field is missing: already reported
        built = None
    if built is not None:
        problems += [_prefixed(where, m, names) for m in built.errors()]
    if problems or built is None:
        raise ConfigError(problems, hint=f"parameters of {cls.__name__}: {describe_params(cls)}")
    return built


def _check_fields(cls: type, values: Mapping[str, Any], where: str) -> tuple[dict[str, Any], list[str]]:
    """``(good values, problems)``: unknown keys, values of the wrong type, missing required fields."""
    fields = [f for f in dataclasses.fields(cls.Params) if f.init]
    names = [f.name for f in fields]
    hints = _hints(cls.Params)
    good: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in values.items():
        if key not in names:
            problems.append(f"{where}.{key}: unknown parameter of {cls.__name__}; "
                            f"{did_you_mean(str(key), names)}valid: {', '.join(names) or '(none)'}")
            continue
        converted = typecheck.convert(hints.get(key, Any), value, f"{where}.{key}", problems)
        if converted is not typecheck.INVALID:
            good[key] = converted
    for f in fields:
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in values:
            problems.append(f"{where}.{f.name}: required parameter of {cls.__name__} is missing")
    return good, problems


def _hints(params_cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(params_cls)
    except Exception:  # annotations naming something unresolvable: skip type checks, keep errors()
        return {}


def param_fields(cls: type) -> list[tuple[str, str, Any]]:
    """``[(name, type name, default)]`` of ``cls.Params``; the default is ``dataclasses.MISSING`` when required."""
    hints = _hints(cls.Params)
    return [(f.name, _type_name(hints.get(f.name, Any)), f.default)
            for f in dataclasses.fields(cls.Params) if f.init]


def describe_params(cls: type) -> str:
    """``"feature_dim: int = 64, eps: float = 1e-12"``: the fields of ``cls.Params`` for messages."""
    parts = [f"{name}: {tp} = {'(required)' if d is dataclasses.MISSING else repr(d)}"
             for name, tp, d in param_fields(cls)]
    return ", ".join(parts) or "(none)"


def build_feature_map(
    name: str,
    num_heads: int,
    head_dim: int,
    params: Mapping[str, Any] | PluginParams | None = None,
    where: str = "attention.feature_map_params",
    *,
    role: str | None = None,
    layer_idx: int | None = None,
) -> FeatureMap:
    """An instance of the feature map ``name`` for ``num_heads`` query heads of size ``head_dim``.

    ``role`` ("q" / "k") and ``layer_idx`` go to its ``__init__`` when it takes them (plugin API v3; an older
    map's ``__init__`` is called as before) and are set on the instance either way."""
    import inspect

    cls = get_feature_map(name)
    built = build_params(cls, params, where)
    try:
        accepted = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):  # a signature Python cannot read: call it the old way
        accepted = {}
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    extra = {k: v for k, v in (("role", role), ("layer_idx", layer_idx)) if takes_all or k in accepted}
    fm = cls(num_heads, head_dim, built, **extra)
    fm.role, fm.layer_idx = role, layer_idx
    return fm


def check_feature_map_output(feature_map: FeatureMap, name: str) -> None:
    """Run ``feature_map`` (built as ``name``) once on a small probe and raise PluginError, naming the plugin
    and its distribution, unless it returns ``(B, H, T, feature_dim)`` features for ``(B, H, T, head_dim)``
    inputs. Conversion calls it once, so a wrong shape fails there, not deep in a kernel (or, with T equal to
    the head size, not at all: the run would train on garbage)."""
    import torch

    heads, dim = feature_map.num_heads, feature_map.head_dim
    try:
        fdim = feature_map.feature_dim
    except Exception:  # noqa: BLE001 -- reported below as a shape nothing can match
        fdim = None
    seq = next(t for t in (5, 7, 11, 13, 17) if t not in (heads, dim, fdim))  # no size the plugin could mix up
    want = (2, heads, seq, fdim)
    try:
        where = next(feature_map.parameters(), None)
        probe = torch.randn(2, heads, seq, dim, generator=torch.Generator().manual_seed(0))
        probe = probe.to(where.device) if where is not None else probe
        with torch.no_grad():
            out = feature_map(probe)
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    except Exception as e:  # noqa: BLE001 -- whatever the plugin raises, name the plugin
        got = f"an error ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
    if got == want:
        return
    info = find_plugin(name, "feature_map")
    raise PluginError(
        f"feature map {name!r} (distribution {info.distribution} {info.version}, {info.target}) returns {got} for "
        f"inputs of shape {(2, heads, seq, dim)}; expected {want}, i.e. (batch, heads, positions, "
        f"feature_dim={fdim})",
        hint=f"fix its forward (check it with lolcats_cli.testing.check_feature_map), report it to the "
        f"{info.distribution} authors, or choose another feature map (lolcats plugins lists them)",
    )


def build_window(
    name: str, params: Mapping[str, Any] | PluginParams | None = None, where: str = "attention.window_params"
) -> Window:
    """An instance of the window ``name``."""
    cls = get_window(name)
    return cls(build_params(cls, params, where))


__all__ = ["PluginInfo", "list_plugins", "clashes", "find_plugin", "load", "get_feature_map", "get_window", "refresh",
           "build_params", "param_fields", "describe_params", "build_feature_map", "build_window",
           "check_feature_map_output"]
