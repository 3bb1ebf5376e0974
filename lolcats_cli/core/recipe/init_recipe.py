"""``lolcats init``'s engine: turn a few answers into a complete, commented YAML recipe.

Pure logic (no typer, rich or questionary): the CLI asks the questions, this module fills in everything
else from the base recipe of the chosen model (the shipped recipe named after it, else the paper's
defaults) and renders every section with a comment on every key.

    text = render_recipe(InitAnswers(feature_map="taylor", tokens=2_000_000), "recipe.yaml")
    write_recipe("recipe.yaml", text)            # refuses to replace an existing file
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ...errors import ConfigError, LolcatsError
from ..model import registry

if TYPE_CHECKING:
    from .recipe import Recipe

PAPER_TOKENS = 20_000_000  # docs/method.md section 3-4: about 20M tokens per stage
LOCAL_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".txt")
_TOKEN_UNITS = {"": 1, "k": 1_000, "m": 1_000_000, "b": 1_000_000_000}


@dataclasses.dataclass
class InitAnswers:
    """What ``lolcats init`` asks. ``None`` = the base recipe's value for this model (:func:`resolve_answers`),
    so ``InitAnswers()`` is the embedded default: SmolLM2-135M, hedgehog, terrace of 64, pydoc, its budget.

    Attributes:
        model: hub id, local folder, .gguf file, or "smollm2-135m" (the embedded default).
        feature_map / window: registered plugin names (``lolcats plugins`` lists them).
        window_size: the window's ``size`` parameter (keys in the softmax window).
        dataset: "pydoc", a hub dataset id, or a local .json / .jsonl / .parquet / .txt file.
        tokens: the token budget of each stage (transfer.max_tokens and finetune.max_tokens).
        lora_rank: LoRA rank of stage 2 (alpha follows, keeping the base recipe's alpha / rank).
        output: the run directory; None = ``runs/<model>``.
        seq_len: tokens per packed training sequence.
    """

    model: str = "smollm2-135m"
    feature_map: str | None = None
    window: str | None = None
    window_size: int | None = None
    dataset: str | None = None
    tokens: int | None = None
    lora_rank: int | None = None
    output: str | None = None
    seq_len: int | None = None


def run_name(model: str) -> str:
    """``"meta-llama/Llama-3.1-8B"`` -> ``"llama-3.1-8b"``: the shipped-recipe name and run folder of a model."""
    return re.sub(r"[^a-z0-9.]+", "-", Path(model).name.lower().removesuffix(".gguf")).strip("-") or "run"


def base_recipe(model: str) -> Recipe:
    """The recipe ``lolcats transfer --model MODEL`` would run (:func:`recipe_for_model`)."""
    return recipe_for_model(model)[0]


def recipe_for_model(model: str) -> tuple[Recipe, str]:
    """``(recipe, why)``: the shipped recipe named after ``model`` if there is one; else the shipped recipe for
    what the model is (its architecture and size, read from its GGUF header or config.json without loading
    weights, see ``core/model/model_facts.py``); else the paper's defaults. ``model.name`` is set to ``model``."""
    from ..model.model_facts import match_recipe, read_model_facts
    from .recipe import Recipe, load_recipe, shipped_recipes  # noqa: F811

    name, shipped = run_name(model), shipped_recipes()
    if name in shipped:
        recipe, why = load_recipe(name), f"the shipped recipe {name}, named after the model"
    elif (facts := read_model_facts(model)) is not None:
        chosen, reason = match_recipe(facts, set(shipped))
        recipe, why = load_recipe(chosen), f"the shipped recipe {chosen}: {reason}"
    else:
        recipe = Recipe()
        why = "the paper's defaults: no shipped recipe is named after the model and its config could not be read"
    recipe.model.name = model
    return recipe, why


def stage_tokens(stage: Any, seq_len: int) -> int | None:
    """The token budget of a recipe stage: its max_tokens, else what max_steps updates consume, else None."""
    if stage.max_tokens is not None:
        return int(stage.max_tokens)
    if stage.max_steps is not None:
        return int(stage.max_steps * stage.batch_size * stage.grad_accum * seq_len)
    return None


def resolve_answers(answers: InitAnswers) -> InitAnswers:
    """A copy of ``answers`` with every ``None`` replaced by the base recipe's value for its model."""
    base = base_recipe(answers.model)
    fill = {
        "feature_map": base.attention.feature_map,
        "window": base.attention.window,
        "window_size": base.attention.window_params.get("size", 64),
        "dataset": base.data.dataset,
        "tokens": stage_tokens(base.transfer, base.data.seq_len) or PAPER_TOKENS,
        "lora_rank": base.finetune.lora.rank,
        "output": base.output.dir or f"runs/{run_name(answers.model)}",
        "seq_len": base.data.seq_len,
    }
    given = {k: v for k, v in dataclasses.asdict(answers).items() if v is not None}
    return InitAnswers(**{**fill, **given})


# ------------------------------------------------------------------------------------------ checks
def parse_tokens(text: str | int) -> int:
    """``"20M"`` -> 20_000_000; also ``500k``, ``1.5B``, ``2_000_000``, ``2,000,000``. Raises ConfigError."""
    hint = "write it like 2000000, 500k, 20M or 1.5B"
    if isinstance(text, bool):
        raise ConfigError(f"token budget {text!r} is not a number of tokens", hint=hint)
    if isinstance(text, int):
        value = float(text)
    else:
        m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmb]?)", str(text).strip().replace("_", "").replace(",", ""), re.I)
        if not m:
            raise ConfigError(f"token budget {text!r} is not a number of tokens", hint=hint)
        value = float(m.group(1)) * _TOKEN_UNITS[m.group(2).lower()]
    if value <= 0 or not value.is_integer():
        raise ConfigError(f"token budget {text!r} must be a positive whole number of tokens", hint=hint)
    return int(value)


def format_tokens(n: int) -> str:
    """20_000_000 -> ``"20M"``, 1_500_000 -> ``"1.5M"``, 500_000 -> ``"500k"``; exact for :func:`parse_tokens`."""
    for unit, size in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= size and (n * 10) % size == 0:
            return f"{n / size:g}{unit}"
    return str(n)


def check_positive_int(value: Any, what: str, minimum: int = 1) -> str | None:
    """The problem with ``value`` as an integer >= ``minimum`` (None when fine); accepts digit strings."""
    if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        return f"{what} must be an integer >= {minimum}, got {value!r}"
    return None


def check_answers(answers: InitAnswers) -> dict[str, str]:
    """Every problem with the given (non-None) answers, as ``{field: message}``; imports no plugin code."""
    a, problems = answers, {}
    if not a.model.strip():
        problems["model"] = "model is empty: give a hub id, a local folder, a .gguf file or smollm2-135m"
    elif a.model.endswith(".gguf") and not Path(a.model).expanduser().is_file():
        problems["model"] = f"GGUF file {a.model!r} does not exist; check the path"
    for field, kind in (("feature_map", "feature_map"), ("window", "window")):
        name = getattr(a, field)
        if name is not None:
            try:
                registry.find_plugin(name, kind)  # type: ignore[arg-type]
            except LolcatsError as err:
                problems[field] = err.message
    for field, what, minimum in (("window_size", "window size", 1), ("lora_rank", "LoRA rank", 1),
                                 ("tokens", "token budget", 1), ("seq_len", "sequence length", 2)):
        value = getattr(a, field)
        if value is not None and (msg := check_positive_int(value, what, minimum)):
            problems[field] = msg
    if a.dataset is not None:
        if not a.dataset.strip():
            problems["dataset"] = "dataset is empty: give pydoc, a hub dataset id or a local file"
        elif a.dataset.lower().endswith(LOCAL_DATA_SUFFIXES) and not Path(a.dataset).expanduser().is_file():
            problems["dataset"] = f"data file {a.dataset!r} does not exist; check the path (or use pydoc)"
    if a.output is not None and not a.output.strip():
        problems["output"] = "the run directory is empty; give a folder such as runs/my-run"
    return problems


# ------------------------------------------------------------------------------------------ building
def build_recipe_dict(answers: InitAnswers) -> dict[str, Any]:
    """The whole recipe as plain dicts: the base recipe of ``answers.model`` with the answers applied,
    validated by :meth:`Recipe.from_dict` (imports no plugin code, so no torch: init stays fast)."""
    from .recipe import Recipe  # noqa: F811

    problems = check_answers(answers)
    if problems:
        raise ConfigError([f"{k}: {v}" for k, v in problems.items()], hint="fix these answers and run init again")
    a = resolve_answers(answers)
    d = base_recipe(a.model).to_dict()
    att = d["attention"]
    if a.feature_map != att["feature_map"]:  # the old plugin's params do not apply: {} = the new one's defaults
        att["feature_map_params"] = {}
    if a.window != att["window"]:
        att["window_params"] = {}
    att["feature_map"], att["window"] = a.feature_map, a.window
    att["window_params"]["size"] = int(a.window_size)  # type: ignore[arg-type]
    d["data"]["dataset"], d["data"]["seq_len"] = a.dataset, int(a.seq_len)  # type: ignore[arg-type]
    for stage in ("transfer", "finetune"):
        d[stage]["max_tokens"], d[stage]["max_steps"] = int(a.tokens), None  # type: ignore[arg-type]
    lora = d["finetune"]["lora"]
    lora["alpha"] = float(lora["alpha"]) / lora["rank"] * int(a.lora_rank)  # type: ignore[arg-type]
    lora["rank"] = int(a.lora_rank)  # type: ignore[arg-type]
    d["output"]["dir"] = a.output
    Recipe.from_dict(d)
    return d


# ------------------------------------------------------------------------------------------ rendering
def next_commands(recipe_path: str | Path, run_dir: str) -> list[str]:
    """The commands that run a recipe written to ``recipe_path`` whose run directory is ``run_dir``."""
    path, run = shlex.quote(str(recipe_path)), shlex.quote(run_dir)
    return [f"lolcats transfer --recipe {path}", f"lolcats finetune {run}", f"lolcats eval {run}",
            f"lolcats chat {run}"]


def render_recipe(answers: InitAnswers, recipe_path: str | Path = "recipe.yaml") -> str:
    """A complete YAML recipe for ``answers``, every section present and every key commented, opening
    with the commands that run it (``recipe_path`` is where it will be written). Loads with ``load_recipe``."""
    from ... import __version__

    d = build_recipe_dict(answers)
    att = d["attention"]
    budget = format_tokens(d["transfer"]["max_tokens"])
    title = (f"{d['model']['name']}, feature map {att['feature_map']}, window {att['window']} "
             f"(size {att['window_params'].get('size')}), {budget} tokens per stage")
    head = _header(title, __version__, next_commands(recipe_path, d["output"]["dir"]), recipe_path)
    return "\n".join(head) + "\n\n" + "\n\n".join(_sections(d)) + "\n"


def write_recipe(path: str | Path, text: str, overwrite: bool = False) -> Path:
    """Write ``text`` to ``path`` (creating parent folders); refuses to replace a file unless ``overwrite``."""
    path = Path(path)
    if path.is_dir():
        raise LolcatsError(f"{path} is a directory, not a recipe file",
                           hint=f"give a file name, such as {path / 'recipe.yaml'}")
    if path.exists() and not overwrite:
        raise LolcatsError(f"{path} already exists; lolcats init does not overwrite it",
                           hint="pass --force to replace it, or give another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w" if overwrite else "x", encoding="utf-8") as f:
        f.write(text)
    return path


# ------------------------------------------------------------------------------------------ comments
SECTION_NOTES: dict[str, str] = {
    "model": "The pretrained model to linearize.",
    "attention": "The hybrid attention that replaces softmax attention in every converted layer: exact softmax\n"
                 "over a window of recent keys plus linear attention, through a feature map, over older ones.",
    "data": "Training text and how it is packed into sequences (both stages read the same data).",
    "transfer": "Stage 1, attention transfer (`lolcats transfer`): only the feature maps and window factors train,\n"
                "to mimic the original softmax attention layer by layer. Stops at whichever comes first:\n"
                "`epochs` passes over the data, max_steps updates, or max_tokens tokens.",
    "finetune": "Stage 2, low-rank adaptation (`lolcats finetune RUN_DIR`): LoRA adapters train on next-token\n"
                "prediction, the attention from stage 1 frozen. Same stopping rule as stage 1.",
    "finetune.lora": "The LoRA adapters (peft); the paper uses rank 8, alpha 16, no dropout, on q/k/v/o.",
    "output": "Where the run goes: `lolcats finetune`, `eval` and `chat` take this folder.",
}
KEY_NOTES: dict[str, str] = {
    "model.name": '"smollm2-135m" (the embedded SmolLM2-135M-Instruct, offline), a hub id, a local folder\n'
                  "or a .gguf file",
    "model.revision": "hub branch, tag or commit (hub ids only); null = the default branch",
    "model.gguf_file": "the .gguf file inside `name` (a folder or a hub repo); null = not a GGUF",
    "model.dtype": "auto (bfloat16 on CUDA, float32 elsewhere), float32, bfloat16 or float16",
    "model.trust_remote_code": "run Python code from the model repo (only for repos you trust)",
    "attention.feature_map": "the feature map of the linear branch; `lolcats plugins` lists those installed",
    "attention.window": "the softmax window: terrace (this block of `size` keys and the previous one), sliding\n"
                        "(the last `size` keys) or none (pure linear attention)",
    "attention.layers": '"all", or the decoder layers (from 0) to convert, e.g. [0, 1, 2]',
    "data.passkey_fraction": "share of training sequences that are synthetic passkey prompts (0 = none)",
    "finetune.objective": "ce = next-token cross-entropy; kl = match the teacher's next-token distribution",
    "attention.kernel": "the attention kernel (chunked, naive, ...); null = the best available for the device",
    "attention.linear_gate": "a learnable per-head weight on the linear branch, starting near 0: the untrained model\n"
                             "is the softmax window with its sinks; false = the paper's method (linear weight 1)",
    "attention.decay": "a learnable per-head decay of the linear branch (heads start at horizons of 64 to 4096\n"
                       "tokens); false = no decay (the paper's method)",
    "attention.delta_rule": "a delta-rule linear state (replaces what it holds along a key instead of adding);\n"
                            "false = the paper's additive state",
    "attention.train_window_sizes": "window sizes drawn at random per training step (e.g. [32, 48, 64, 96, 128]) so the\n"
                                    "linear branch must carry what the window drops; null = always window_params.size",
    "attention.softmax_layers": "layers kept as softmax attention after stage 1: auto:K = the K with the highest\n"
                                "transfer MSE, or a list of indices; null = none",
    "data.dataset": "pydoc (CPython's help pages, offline), a hub dataset id (yahma/alpaca-cleaned) or a local\n"
                    ".json / .jsonl / .parquet / .txt file",
    "data.split": "the hub dataset split to read (ignored for local files and pydoc)",
    "data.template": "auto, alpaca (instruction/input/output), text (one text field) or chat (the chat template)",
    "data.text_field": 'the column holding the text for the "text" template; null = "text"',
    "data.seq_len": "tokens per packed training sequence",
    "data.holdout": "examples held out for evaluation, from the start (packed sequences for pydoc and .txt)",
    "data.max_samples": "at most this many training examples; null = all",
    "data.num_eval_sequences": "at most this many held-out sequences are evaluated; null = all",
    "lr": "peak learning rate (AdamW)",
    "weight_decay": "AdamW weight decay",
    "batch_size": "sequences per micro-batch",
    "grad_accum": "micro-batches per optimizer update",
    "epochs": "passes over the training sequences",
    "max_steps": "stop after this many optimizer updates; null = no cap",
    "max_tokens": "the token budget: stop after this many training tokens; null = no cap",
    "eval_every": "evaluate on the held-out sequences every this many updates (the best is kept)",
    "scheduler": "plateau (ReduceLROnPlateau on the held-out loss), constant or cosine",
    "plateau_factor": "ReduceLROnPlateau: multiply the learning rate by this on a plateau",
    "plateau_patience": "ReduceLROnPlateau: evaluations without improvement before reducing",
    "grad_clip": "max gradient norm; null = no clipping",
    "seed": "seeds the data order and the initialisation",
    "save_every": "checkpoint every this many updates; null = at every evaluation",
    "save_every_minutes": "also checkpoint after this many minutes of training; null = only by steps",
    "transfer.mse_weight": "factor on the mean per-head output MSE (the paper: 1000)",
    "transfer.attn_ce_weight": "factor on the attention-weight cross-entropy (0 at 8B / 70B, 1 at 405B)",
    "transfer.attn_ce_queries": "queries per sequence sampled for that cross-entropy",
    "transfer.block_size": "null = train all layers jointly; k = block-wise transfer in blocks of k layers",
    "transfer.block_cache_dtype": "how block-wise transfer stores each block's inputs: bfloat16 (2 bytes a value), float32 or float8 (1 byte, a scale per sequence)",
    "finetune.train_attention": "also train the feature maps and window factors in stage 2",
    "finetune.mask_prompt": "no loss on the prompt tokens of instruction data",
    "finetune.lora.rank": "rank of each adapter",
    "finetune.lora.alpha": "scale = alpha / rank",
    "finetune.lora.dropout": "dropout on the adapter input",
    "finetune.lora.targets": "the projections that get adapters",
    "output.dir": "the run directory (checkpoints, resolved recipe, metrics); null = runs/<model>",
}


def _schema(path: str) -> Any:
    """The recipe dataclass at dotted ``path`` ("" = Recipe, "finetune.lora" = LoraConfig)."""
    import typing

    from .recipe import Recipe  # noqa: F811

    cls: Any = Recipe
    for part in filter(None, path.split(".")):
        cls = typing.get_type_hints(cls)[part]
    return cls


def _doc_note(cls: Any, name: str) -> str | None:
    """``name``'s entry in ``cls``'s docstring ("name: text."), for keys this module has no note for."""
    m = re.search(rf"(?:^|\s){re.escape(name)}: (.+?)(?:\.(?:\s|$)|\n|$)", cls.__doc__ or "", re.M)
    return m.group(1).strip() if m else None


def _note(path: str, cls: Any, key: str, section: dict[str, Any]) -> str:
    """The comment for ``key`` of the section at ``path``: this module's note, else the schema docstring's."""
    if path == "attention" and key in ("feature_map_params", "window_params"):
        name = section["feature_map" if key == "feature_map_params" else "window"]
        return f"parameters of {name}, the others at their defaults; `lolcats plugins {name}` lists them all"
    dotted = f"{path}.{key}"
    return (KEY_NOTES.get(dotted) or KEY_NOTES.get(key) or _doc_note(cls, key)
            or f"see {cls.__name__} in lolcats_cli/core/recipe/recipe.py")


def _flow(value: Any) -> str:
    """``value`` as one line of YAML (lists and mappings in flow style)."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10_000)
    return text.removesuffix("\n...\n").rstrip("\n")


def _comment(text: str, indent: str) -> list[str]:
    return [f"{indent}# {line}".rstrip() for line in text.splitlines()]


def _block(path: str, values: dict[str, Any], depth: int) -> list[str]:
    """The commented YAML lines of the section at ``path``, nested sections as indented blocks."""
    indent, cls, out = "  " * depth, _schema(path), []
    for key, value in values.items():
        child = f"{path}.{key}" if path else key
        if dataclasses.is_dataclass(_schema(child)) and isinstance(value, dict):
            out += _comment(SECTION_NOTES.get(child) or (_schema(child).__doc__ or "").split(".")[0] + ".", indent)
            out += [f"{indent}{key}:", *_block(child, value, depth + 1)]
        else:
            out += _comment(_note(path, cls, key, values), indent) + [f"{indent}{key}: {_flow(value)}"]
    return out


def _sections(d: dict[str, Any]) -> list[str]:
    """One commented block per top-level section, in schema order."""
    return ["\n".join(_block("", {name: d[name]}, 0)) for name in d]


def _header(title: str, version: str, commands: list[str], recipe_path: str | Path) -> list[str]:
    """The opening comment block: what the recipe is and the exact commands that run it."""
    what = ["stage 1: attention transfer, creates the run directory", "stage 2: LoRA fine-tuning",
            "evaluate the linearized model", "talk to it"]
    width = max(len(c) for c in commands)
    path = shlex.quote(str(recipe_path))
    return [
        f"# lolcats recipe: {title}.",
        f"# Written by `lolcats init` (lolcats {version}); every setting is here, each with a comment.",
        "#",
        "# Run it, one stage after the other:",
        *[f"#   {c.ljust(width)}   # {w}" for c, w in zip(commands, what)],
        "#",
        "# Change a setting for one run without editing this file (any key, dotted):",
        f"#   lolcats transfer --recipe {path} transfer.lr=1e-3 data.seq_len=512",
    ]


__all__ = ["InitAnswers", "PAPER_TOKENS", "base_recipe", "recipe_for_model", "resolve_answers", "parse_tokens", "format_tokens",
           "check_answers", "check_positive_int", "build_recipe_dict", "render_recipe", "next_commands",
           "write_recipe", "run_name"]
