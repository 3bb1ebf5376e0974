"""The ``hf`` export: a self-contained Hugging Face model folder that needs no lolcats to load.

The folder holds the full weights (LoRA merged, safetensors), the tokenizer, the generation config, and
Python modules that transformers' dynamic-module loader copies and imports under ``trust_remote_code``:

* ``configuration_lolcats.py``: the base architecture's config class under ``model_type = "lolcats_<base>"``
  (so loading without ``trust_remote_code`` fails loudly instead of giving a plain softmax model);
* ``modeling_lolcats.py``: ``LolcatsForCausalLM``, a subclass of the base architecture's own causal LM (weights
  load by their usual names) that swaps the converted layers' attention at init (student mode, which decodes
  with the recurrent kernel in constant memory through any transformers cache) and whose ``generate()``
  takes the static decode loop as :func:`~lolcats_cli.core.decode.static_decode.install_static_generate` makes
  lolcats' own models do (:func:`~lolcats_cli.core.decode.static_decode.static_generate_kwargs`: greedy and
  sampling calls on CUDA replay one CUDA-graph-captured step per token, with the fused Triton step where
  lolcats would use it; ``LOLCATS_STATIC_DECODE=0`` turns it off, ``=1`` on on any device; beam search and the
  like keep transformers' loop);
* the runtime, bundled by source: the attention module, every registered kernel (``LOLCATS_KERNEL`` picks
  one there too), the static decode path (its loop, :mod:`~lolcats_cli.kernels.static` and the Triton step),
  and the feature map's and window's plugin modules (built-in or third-party, found with :mod:`inspect`), each
  import of ``lolcats_cli`` (or of the plugin's own package) rewritten to a flat relative import of the
  bundled copy.

:func:`bundle_modules` is generic: it follows the ``from ... import`` statements of the root modules into
every bundled package and fails with :class:`~lolcats_cli.errors.PluginError` when a source cannot be
bundled (no ``.py`` file, an ``import package.module`` statement it cannot rewrite).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import inspect
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ... import __version__
from ...errors import ConfigError, PluginError
from ..runs.rundir import RESOLVED_RECIPE, has_lora

if TYPE_CHECKING:
    import torch

CONFIG_MODULE = "configuration_lolcats"
MODELING_MODULE = "modeling_lolcats"
CONFIG_CLASS = "LolcatsConfig"
MODEL_CLASS = "LolcatsForCausalLM"
HF_FORMAT_VERSION = 1
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")


# ------------------------------------------------------------------------------------ source bundling


@dataclasses.dataclass
class Bundle:
    """Bundled modules: ``files`` maps a flat module name (``lolcats_api``) to its rewritten source, in
    dependency order; ``names`` maps each absolute module name to its flat name; ``external`` holds the
    top-level non-stdlib packages the bundled code imports (torch, transformers, a plugin's own deps)."""

    files: dict[str, str] = dataclasses.field(default_factory=dict)
    names: dict[str, str] = dataclasses.field(default_factory=dict)
    external: set[str] = dataclasses.field(default_factory=set)


def flat_name(module: str) -> str:
    """``lolcats_cli.kernels.naive`` -> ``lolcats_kernels_naive``; a plugin's ``pkg.mod`` -> ``plugin_pkg_mod``."""
    top, _, rest = module.partition(".")
    if top == "lolcats_cli":
        return "lolcats_" + (rest.replace(".", "_") or "init")
    return "plugin_" + module.replace(".", "_")


def _locate(module: str, why: str) -> tuple[Path, bool]:
    """``(source file, is_package)`` of an importable module; PluginError when it has no ``.py`` source."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        spec, err = None, exc
    else:
        err = None
    origin = getattr(spec, "origin", None)
    if spec is None or not origin or not origin.endswith(".py") or not Path(origin).is_file():
        raise PluginError(
            f"cannot bundle module {module!r} ({why}): no Python source file"
            + (f" ({type(err).__name__}: {err})" if err else f" (origin: {origin!r})"),
            hint="the hf export copies plugin source code; install the plugin from source (a .py module), "
            "or export with --format adapter, which needs lolcats and the plugin installed to load",
        )
    return Path(origin), spec.submodule_search_locations is not None


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a ``from ... import`` statement of ``module`` names."""
    if node.level == 0:
        return node.module or ""
    parts = (module if is_package else module.rpartition(".")[0]).split(".")
    if node.level - 1 >= len(parts):
        raise PluginError(f"{module}: relative import beyond its top-level package (level {node.level})")
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_submodule(package: str, name: str) -> bool:
    try:
        spec = importlib.util.find_spec(package)
        return spec is not None and spec.submodule_search_locations is not None and (
            importlib.util.find_spec(f"{package}.{name}") is not None
        )
    except (ImportError, ValueError):
        return False


def _guarded(tree: ast.Module) -> set[int]:
    """ids of import nodes inside ``try:`` or ``if TYPE_CHECKING:`` blocks (optional or typing-only)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        typing_only = isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        if isinstance(node, ast.Try) or typing_only:
            out.update(id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return out


def _aliases(names: list[ast.alias]) -> str:
    return ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in names)


def bundle_modules(roots: list[str], packages: set[str]) -> Bundle:
    """Bundle ``roots`` and every module of ``packages`` they import (recursively), rewriting those imports.

    ``from X import a`` with X in a bundled package becomes ``from .<flat X> import a``; ``from P import m``
    (m a submodule) and ``import P.m as m`` become ``from . import <flat P.m> as m``. ``import P.m`` without
    ``as`` cannot be rewritten and raises PluginError naming the file and line.
    """
    bundle = Bundle()
    taken: dict[str, str] = {}

    def visit(module: str, why: str) -> str:
        if module in bundle.names:
            return bundle.names[module]
        flat = flat_name(module)
        if flat in taken:
            raise PluginError(f"modules {taken[flat]!r} and {module!r} would both be bundled as {flat}.py",
                              hint="rename one of the plugin modules")
        taken[flat] = module
        bundle.names[module] = flat
        path, is_package = _locate(module, why)
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source, filename=str(path))
        guarded = _guarded(tree)
        edits: list[tuple[ast.stmt, str]] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _absolute(node, module, is_package)
                top = target.partition(".")[0]
                if top not in packages:
                    if node.level == 0 and id(node) not in guarded and top != "__future__":
                        bundle.external.add(top)
                    continue
                subs = [a for a in node.names if _is_submodule(target, a.name)]
                if subs and len(subs) != len(node.names):
                    raise PluginError(f"{path}:{node.lineno}: mixes submodules and names in one import from {target}",
                                      hint="split it into one import per kind")
                if subs:
                    parts = [f"{visit(f'{target}.{a.name}', f'imported by {module}')} as {a.asname or a.name}"
                             for a in subs]
                    edits.append((node, "from . import " + ", ".join(parts)))
                else:
                    flat_target = visit(target, f"imported by {module}")
                    edits.append((node, f"from .{flat_target} import {_aliases(node.names)}"))
            elif isinstance(node, ast.Import):
                stmts = []
                for a in node.names:
                    top = a.name.partition(".")[0]
                    if top not in packages:
                        if id(node) not in guarded:
                            bundle.external.add(top)
                        stmts.append(f"import {a.name}" + (f" as {a.asname}" if a.asname else ""))
                    elif a.asname is None:
                        raise PluginError(
                            f"{path}:{node.lineno}: `import {a.name}` cannot be bundled (it binds the package name)",
                            hint=f"write `from {a.name.rpartition('.')[0] or a.name} import ...` or "
                            f"`import {a.name} as name` in the plugin",
                        )
                    else:
                        stmts.append(f"from . import {visit(a.name, f'imported by {module}')} as {a.asname}")
                if any(a.name.partition(".")[0] in packages for a in node.names):
                    edits.append((node, "; ".join(stmts)))
        bundle.files[flat] = _header(module, path) + _apply(source, edits)
        return flat

    for root in roots:
        visit(root, "a root of the runtime")
    bundle.external -= set(sys.stdlib_module_names) | packages | {""}
    return bundle


def _apply(source: str, edits: list[tuple[ast.stmt, str]]) -> str:
    """Replace each statement's exact span (ast offsets are UTF-8 byte columns) by its new text."""
    data = source.encode("utf-8")
    starts = [0]
    for line in data.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    spans = sorted(
        ((starts[n.lineno - 1] + n.col_offset, starts[n.end_lineno - 1] + n.end_col_offset, text)  # type: ignore[index]
         for n, text in edits),
        reverse=True,
    )
    for begin, end, text in spans:
        data = data[:begin] + text.encode("utf-8") + data[end:]
    return data.decode("utf-8")


def _header(module: str, path: Path) -> str:
    return f"# Bundled by `lolcats export --format hf` (lolcats {__version__}): module {module} ({path.name}).\n"


# ------------------------------------------------------------------------------------- generated code

CONFIG_TEMPLATE = '''"""The config of a LoLCATs-linearized {base_config}, written by lolcats {version}.

The base architecture's config under its own ``model_type``; the ``lolcats`` entry of config.json holds the
attention settings (feature map, window, their parameters, converted layers).
"""

from {base_config_module} import {base_config}


class {config_class}({base_config}):
    model_type = "{model_type}"
'''

MODELING_TEMPLATE = '''"""A LoLCATs-linearized {base_class}, written by `lolcats export` (lolcats {version}).

``{model_class}`` is the base architecture's own causal LM: weights load under their usual names. At init,
the attention of every converted decoder layer (``config.lolcats["layers"]``) is replaced by the bundled
hybrid attention (a softmax window plus feature-map linear attention; see docs/method.md of lolcats), in
student mode. Decoding keeps a constant-size recurrent state per converted layer in whatever
transformers cache ``generate()`` builds (the bundled ``HybridLayer``): O(window) work and memory per token.

``generate()`` takes the bundled static decode loop where it applies (``static_generate_kwargs`` per call):
greedy or sampling calls on CUDA, on a model the static path runs (every layer converted, the additive
state, an exact kernel: ``static_decode_problem`` says why not), decode through preallocated state buffers,
one CUDA-graph replay per token (with triton installed, each layer's step the fused Triton one where the
window is a built-in sliding or terrace one; ``LOLCATS_TRITON_STEP=0`` turns that off). ``LOLCATS_STATIC_DECODE=0``
turns that off, ``LOLCATS_STATIC_DECODE=1`` on on any device (eager steps off CUDA); beam search, assisted or
contrastive decoding, returned attentions or hidden states and ``custom_generate`` calls run transformers'
own loop, as does every call the static path cannot take.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
{external_imports}
from {base_module} import {base_class}

from .{config_module} import {config_class}
from .{attention_module} import LinearizedAttention
from .{compat_module} import rotary_function as _rotary_function
from .{feature_map_module} import {feature_map_class} as _FeatureMap
from .{window_module} import {window_class} as _Window
from .{static_module} import static_generate_kwargs as _static_generate_kwargs
{manifest}


def _params(cls: type, values: dict[str, Any]) -> Any:
    names = {{f.name for f in dataclasses.fields(cls.Params) if f.init}}
    return cls.Params(**{{k: v for k, v in values.items() if k in names}})


def _decoder_layers(model: torch.nn.Module, paths: list[str]) -> torch.nn.ModuleList:
    for path in paths:
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise ValueError(f"cannot find the decoder layers of {{type(model).__name__}} (looked for {{paths}})")


class {model_class}({base_class}):
    config_class = {config_class}
    _keep_in_fp32_modules_strict = [  # fp32, as trained
        "feature_map_q", "feature_map_k", "window_logits", "linear_logits", "log_horizon", "beta_weight", "beta_bias"
    ]

    def __init__(self, config: {config_class}) -> None:
        super().__init__(config)
        settings = config.lolcats
        layers = _decoder_layers(self, settings["decoder_layers"])
        fm, win = settings["feature_map"], settings["window"]
        for i, teacher_window in zip(settings["layers"], settings["teacher_sliding_windows"]):
            original = getattr(layers[i], settings["attention_attr"])
            heads, head_dim = original.config.num_attention_heads, original.head_dim
            module = LinearizedAttention(
                original,
                feature_map_q=_FeatureMap(heads, head_dim, _params(_FeatureMap, fm["params"])),
                feature_map_k=_FeatureMap(heads, head_dim, _params(_FeatureMap, fm["params"])),
                window=_Window(_params(_Window, win["params"])),
                rotary=_rotary_function("{rotary_module}", "{rotary_fn}"),
                qk_norm=settings["qk_norm"],
                sliding_window=teacher_window,
                mode="student",
                plugins={{"feature_map": fm["name"], "feature_map_params": fm["params"],
                          "window": win["name"], "window_params": win["params"]}},
                linear_gate=bool(settings.get("linear_gate", False)),
                decay=bool(settings.get("decay", False)),
                delta_rule=bool(settings.get("delta_rule", False)),
            )
            for _map, _role in ((module.feature_map_q, "q"), (module.feature_map_k, "k")):
                _map.role, _map.layer_idx = _role, i  # as lolcats sets them (plugin API v3)
            setattr(layers[i], settings["attention_attr"], module)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The base class's ``generate``, through the bundled static decode loop where it applies (module docstring)."""
        return super().generate(*args, **_static_generate_kwargs(self, kwargs))


__all__ = ["{model_class}"]
'''


def _source_module(obj: Any, what: str) -> str:
    """The module of a plugin class, checked to have a source file :mod:`inspect` can find."""
    module = obj.__module__
    try:
        source = inspect.getsourcefile(obj)
    except (TypeError, OSError):
        source = None
    if module == "__main__" or not source:
        raise PluginError(
            f"the {what} class {obj.__qualname__} (module {module!r}) has no importable source file to bundle",
            hint="define plugins in an installed module (registered through lolcats entry points), or export "
            "with --format adapter",
        )
    return module


def write_code(out: Path, settings: dict[str, Any], base_model: Any, feature_map_cls: type, window_cls: type,
               rotary: tuple[str, str]) -> list[str]:
    """Write the bundled runtime, ``configuration_lolcats.py`` and ``modeling_lolcats.py`` into ``out``.

    ``base_model``: the (converted) causal LM whose class the export subclasses; ``rotary``: the
    architecture's ``(module, function)`` for RoPE. Returns the written file names.
    """
    from ... import hf_compat
    from ...kernels import registry
    from ..decode import static_decode
    from ..model import linear_attention

    fm_module = _source_module(feature_map_cls, "feature map")
    win_module = _source_module(window_cls, "window")
    packages = {"lolcats_cli", fm_module.partition(".")[0], win_module.partition(".")[0]}
    # registry: every kernel; static_decode: generate()'s static loop (kernels.static, the Triton step)
    roots = [linear_attention.__name__, registry.__name__, static_decode.__name__, fm_module, win_module]
    bundle = bundle_modules(roots, packages)
    written = []
    for flat, text in bundle.files.items():
        (out / f"{flat}.py").write_text(text, encoding="utf-8")
        written.append(f"{flat}.py")

    config_cls, model_cls = type(base_model.config), type(base_model)
    external = sorted(bundle.external - {"torch", "transformers"})
    fields = {
        "version": __version__, "config_class": CONFIG_CLASS, "model_class": MODEL_CLASS,
        "config_module": CONFIG_MODULE,
    }
    (out / f"{CONFIG_MODULE}.py").write_text(CONFIG_TEMPLATE.format(
        **fields, base_config=config_cls.__name__, base_config_module=config_cls.__module__,
        model_type=settings["model_type"],
    ), encoding="utf-8")
    manifest = "\n".join(  # names every bundled module so transformers copies each one
        f"from .{flat} import __name__ as _bundled_{i}  # noqa: F401" for i, flat in enumerate(bundle.files)
    )
    (out / f"{MODELING_MODULE}.py").write_text(MODELING_TEMPLATE.format(
        **fields,
        base_class=model_cls.__name__, base_module=model_cls.__module__,
        rotary_module=rotary[0], rotary_fn=rotary[1],
        attention_module=bundle.names[linear_attention.__name__],
        compat_module=bundle.names[hf_compat.__name__],
        static_module=bundle.names[static_decode.__name__],
        feature_map_module=bundle.names[fm_module], feature_map_class=feature_map_cls.__name__,
        window_module=bundle.names[win_module], window_class=window_cls.__name__,
        external_imports="".join(f"import {name}  # noqa: F401 (bundled plugin code needs it)\n" for name in external),
        manifest=manifest,
    ), encoding="utf-8")
    return written + [f"{CONFIG_MODULE}.py", f"{MODELING_MODULE}.py"]


def export_dtype(dtype: str, base_config: Any) -> torch.dtype:
    """The dtype of the exported weights: ``dtype`` by name, or for ``"auto"`` the base checkpoint's own
    (``config.dtype``; float32 when it names none). ConfigError for an unknown name."""
    import torch

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype: {dtype!r} is not a weights dtype; choose one of: {', '.join(DTYPES)}",
                          hint="auto = the base model's own dtype (bfloat16 for most recent LLMs)")
    if dtype != "auto":
        return getattr(torch, dtype)
    own = getattr(base_config, "dtype", None)
    own = getattr(torch, own, None) if isinstance(own, str) else own
    return own if own in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def write_hf_export(run_dir: Path, out: Path, dtype: str = "auto") -> None:
    """Rebuild the run (LoRA merged, on CPU) and write the self-contained model folder into ``out``.

    Weights are saved in :func:`export_dtype`; feature maps and window logits always stay fp32.
    """
    from ..model.architectures import arch_spec
    from ..model.convert import describe
    from ..model.linear_attention import linearized_layers
    from ..model.models import read_base_config
    from ..recipe.recipe import load_recipe
    from ..runs.workspace import open_run, plugin_versions

    target = export_dtype(dtype, read_base_config(load_recipe(Path(run_dir) / RESOLVED_RECIPE).model))
    recipe, model, tokenizer = open_run(run_dir, "cpu", mode="student", merge_lora=True)
    converted = linearized_layers(model)
    first = converted[0][1]
    spec = arch_spec(model.config)
    info = describe(model)
    base_type = model.config.model_type
    settings = {
        "format_version": HF_FORMAT_VERSION,
        "lolcats_version": __version__,
        "model_type": f"lolcats_{base_type}",
        "base_model_type": base_type,
        "base_model": {
            "name": recipe.model.name, "revision": recipe.model.revision, "gguf_file": recipe.model.gguf_file,
        },
        "feature_map": {"name": info["feature_map"], "params": info["feature_map_params"]},
        "window": {"name": info["window"], "params": info["window_params"]},
        "layers": info["layers"],
        "linear_gate": info["linear_gate"],
        "decay": info["decay"],
        "delta_rule": info["delta_rule"],
        "teacher_sliding_windows": [m.sliding_window for _, m in converted],
        "decoder_layers": list(spec.layers),
        "attention_attr": spec.attention,
        "qk_norm": spec.qk_norm,
        "plugins": plugin_versions(recipe),
        "lora_merged": has_lora(run_dir),
    }
    if getattr(model, "hf_quantizer", None) is not None:  # a dequantized GGUF: nothing is quantized any more
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    rotary = (spec.modeling_module, spec.rotary_fn)
    write_code(out, settings, model, type(first.feature_map_q), type(first.window), rotary)
    model.to(target)
    for _, module in converted:  # the new parameters stay fp32, as trained (the runtime computes in fp32)
        module.feature_map_q.float()
        module.feature_map_k.float()
        module.window_logits.data = module.window_logits.data.float()
        for extra in (module.linear_logits, module.log_horizon):
            if extra is not None:
                extra.data = extra.data.float()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config", None)
    config.update({
        "model_type": settings["model_type"],
        "architectures": [MODEL_CLASS],
        "auto_map": {
            "AutoConfig": f"{CONFIG_MODULE}.{CONFIG_CLASS}",
            "AutoModelForCausalLM": f"{MODELING_MODULE}.{MODEL_CLASS}",
        },
        "lolcats": settings,
        "dtype": str(target).removeprefix("torch."),
    })
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


__all__ = [
    "CONFIG_CLASS",
    "DTYPES",
    "MODEL_CLASS",
    "Bundle",
    "bundle_modules",
    "export_dtype",
    "flat_name",
    "write_code",
    "write_hf_export",
]
