"""`lolcats export`: a finished run as a small adapter or a self-contained Hugging Face model folder."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from .reporting import stderr, stdout

FORMATS = ("adapter", "hf")

EXAMPLES = """
[bold]Examples[/bold]

  [dim]# a self-contained Hugging Face folder (LoRA merged), loadable where lolcats is not installed[/dim]
  lolcats export runs/smollm2-135m-finetune --out exports/smollm2-linear --format hf

  [dim]# the same in bfloat16 (half the size of float32)[/dim]
  lolcats export runs/smollm2-135m-finetune --out exports/smollm2-linear-bf16 --format hf --dtype bfloat16

  [dim]# load it anywhere with transformers (no lolcats needed)[/dim]
  python -c "import transformers as t; t.AutoModelForCausalLM.from_pretrained('exports/smollm2-linear', trust_remote_code=True)"

  [dim]# a few MB on top of the base model (needs lolcats and the plugins to load)[/dim]
  lolcats export runs/smollm2-135m --out exports/smollm2-adapter --format adapter

  [dim]# replace an earlier export, print the file list as JSON[/dim]
  lolcats export runs/smollm2-135m --out exports/smollm2-adapter --format adapter --overwrite --json
"""

LOAD_HINTS = {
    "hf": "load: AutoModelForCausalLM.from_pretrained({out!r}, trust_remote_code=True)  "
    "(AutoTokenizer too: trust_remote_code=True)",
    "adapter": "load: from lolcats_cli.core.export.export import load_adapter_export; "
    "model = load_adapter_export({out!r})",
}


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def export(
    run_dir: Path = typer.Argument(..., help="A finished `lolcats transfer` or `lolcats finetune` run directory.",
                                   show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="The folder to write (must not exist, or be empty).",
                             show_default=False),
    fmt: str = typer.Option(..., "--format", "-f", help="adapter (a few MB, on top of the base model) or hf "
                            "(a self-contained Hugging Face model folder).", show_default=False),
    dtype: str = typer.Option("auto", "--dtype", help="hf only: weights dtype (auto = the base model's own, "
                              "float32, bfloat16, float16); feature maps stay float32."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing export in --out."),
    as_json: bool = typer.Option(False, "--json", help="Print the written files as JSON on stdout."),
) -> None:
    """Export a run: as an adapter (feature maps, window factors and LoRA) or as a Hugging Face model folder."""
    if fmt not in FORMATS:
        raise typer.BadParameter(f"{fmt!r} is not an export format; use one of: {', '.join(FORMATS)}",
                                 param_hint="--format")
    from ..core.export.export import export_run, list_files

    stderr.print(f"[bold]lolcats export[/bold] {run_dir} → {out} ({fmt})")
    folder = export_run(run_dir, out, fmt, overwrite=overwrite, dtype=dtype)  # type: ignore[arg-type]
    files = list_files(folder)
    total = sum(size for _, size in files)
    if as_json:
        stdout.print_json(json.dumps({"out": str(folder), "format": fmt, "bytes": total,
                                      "files": [{"path": p, "bytes": s} for p, s in files]}))
        return
    table = Table(title=f"{fmt} export: {folder}", title_justify="left", header_style="bold")
    table.add_column("file")
    table.add_column("size", justify="right")
    for path, size in files:
        table.add_row(path, _size(size))
    table.add_row("[bold]total[/bold]", f"[bold]{_size(total)}[/bold]")
    stdout.print(table)
    stdout.print(LOAD_HINTS[fmt].format(out=str(folder)), highlight=False, soft_wrap=True)


__all__ = ["EXAMPLES", "export"]
