"""The hidden-state cache of block-wise transfer: each block's raw residual-stream input, stored once.

Layout under ``run_dir/blocks/``::

    inputs/manifest.json                       shapes, dtype, blocks, rows per split and shard (written last)
    inputs/train/block-003-00000.safetensors   {"hidden": (rows, seq_len, hidden)} rows 0.. of the shard
    inputs/heldout/block-003-00000.safetensors
    block-003.safetensors                      the block's trained attention parameters (it is done)
    block-003.json                             its per-layer table and fit summary

The input of block ``b`` is what enters its first decoder layer: the residual stream itself, not the
normalised state the layer's input norm makes of it (the reference stored the normalised one, a bug). Sizes:
``bytes per value x tokens x hidden size x blocks`` (2 bytes in bf16, the default; 1 in float8). A block's
inputs are deleted once the block is trained.

``float8`` stores ``torch.float8_e4m3fn`` values with one float32 scale per stored row (a sequence), beside them
in the same file as ``"scale"`` ``(rows,)``: value = float8 x scale, the row's largest magnitude mapped to 448
(the format's largest), so every value keeps e4m3's 3 mantissa bits (at most 2^-4 = 6.25% off; values below
2^-6 of the row's scale are subnormal, at most ``scale x 2^-10`` off). Per row, not per shard: a row quantizes
as soon as the teacher computes it (a shard is never held in high precision), its stored bytes do not depend on
which other rows share its shard, and one outlier sequence costs only its own resolution; the scales add 4 bytes
a row, left out of the size estimates (under 0.01% of a row of 4096 tokens). Reads dequantise to float32 (the
block's forward casts to its layers' dtype).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ....errors import TrainingError
from ..checkpoint import load_json, save_json, save_tensors

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float8": torch.float8_e4m3fn}
FLOAT8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
SHARD_BYTES = 1 << 30  # about 1 GiB per shard file
MANIFEST_FORMAT = "lolcats-block-inputs-1"


@dataclasses.dataclass(frozen=True)
class Block:
    """Decoder layers ``start .. stop - 1``; ``index`` counts every block of the model from 0."""

    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"block-{self.index:03d}"

    @property
    def label(self) -> str:
        return f"layers {self.start}-{self.stop - 1}" if self.stop - self.start > 1 else f"layer {self.start}"


def plan_blocks(num_layers: int, block_size: int, converted: Sequence[int]) -> list[Block]:
    """The blocks of ``block_size`` layers (the last may be shorter) that hold at least one converted layer."""
    wanted = set(converted)
    blocks = [Block(i, s, min(s + block_size, num_layers)) for i, s in enumerate(range(0, num_layers, block_size))]
    return [b for b in blocks if wanted & set(range(b.start, b.stop))]


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``(rows, ...)`` as float8 e4m3 values and one float32 scale per row (``x ~ values x scale``)."""
    x = x.float()
    amax = x.abs().flatten(1).amax(dim=1)
    scale = torch.where(amax > 0, amax / FLOAT8_MAX, torch.ones_like(amax))
    shaped = scale.view(-1, *[1] * (x.ndim - 1))
    return (x / shaped).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(torch.float8_e4m3fn), scale


def dequantize_rows(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 rows :func:`quantize_rows` stored as ``values`` and ``scale``."""
    return values.float() * scale.view(-1, *[1] * (values.ndim - 1))


def disk_formula(bytes_per_value: int, tokens: int, hidden: int, blocks: int) -> str:
    """How the stored block inputs' size is reckoned, in words (the disk check and --dry-run say it)."""
    unit = "byte" if bytes_per_value == 1 else "bytes"
    return f"{bytes_per_value} {unit} x {tokens:,} tokens x {hidden} hidden x {blocks} blocks"


def free_bytes(path: Path) -> int:
    """Free space on the disk that holds ``path`` (or its nearest existing parent)."""
    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


class StoredRows:
    """One block's stored inputs of one split as a :class:`~lolcats_cli.core.train.trainer.RowSource`."""

    def __init__(self, cache: BlockCache, split: str, block: Block) -> None:
        self.cache, self.split, self.block = cache, split, block
        self.num_rows, self.seq_len = cache.rows[split], cache.seq_len
        self._open: dict[int, Any] = {}
        self._where: torch.Tensor | None = None  # a source row's stored position (-1: not stored)
        ids = cache.row_ids.get(split)
        if ids is not None:
            self.num_rows = cache.source_rows[split]
            self._where = torch.full((self.num_rows,), -1, dtype=torch.long)
            self._where[ids] = torch.arange(len(ids))

    def _file(self, shard: int) -> Any:
        if shard not in self._open:
            path = self.cache.input_path(self.split, self.block, shard)
            if not path.exists():
                raise TrainingError(f"{path} is missing: the stored inputs of {self.block.name} are incomplete",
                                    "run again with --resume: the teacher pass recomputes missing files")
            self._open[shard] = safe_open(str(path), framework="pt")
        return self._open[shard]

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        if self._where is not None:
            where = self._where[rows]
            if bool((where < 0).any()):
                raise TrainingError(f"rows {rows[where < 0].tolist()} of {self.split} were not stored for {self.block.name}",
                                    f"delete {self.cache.inputs} and run again with --resume: the teacher pass stores them")
            rows = where
        out = []
        for r in rows.tolist():
            shard, offset = divmod(int(r), self.cache.shard_rows)
            stored = self._file(shard)
            hidden = stored.get_slice("hidden")[offset : offset + 1]
            if self.cache.scaled:
                hidden = dequantize_rows(hidden, stored.get_slice("scale")[offset : offset + 1])
            out.append(hidden)
        return torch.cat(out)


class BlockCache:
    """Where the teacher pass writes each block's inputs and each block's training leaves its result."""

    def __init__(self, root: Path, blocks: Sequence[Block], *, seq_len: int, hidden: int, dtype: str,
                 rows: dict[str, int], shard_rows: int | None = None,
                 row_ids: dict[str, torch.Tensor] | None = None) -> None:
        """``rows``: the rows of each split; ``row_ids``: for a split of which only some rows are stored (those
        training reads), their indices among its ``rows[split]`` (sorted); :meth:`stored` maps them back."""
        self.root, self.blocks = Path(root), list(blocks)
        self.seq_len, self.hidden, self.dtype_name = seq_len, hidden, dtype
        self.dtype = DTYPES[dtype]
        self.scaled = dtype == "float8"  # values with a float32 scale per row
        self.row_ids = dict(row_ids or {})
        self.source_rows = dict(rows)
        self.rows = {split: len(self.row_ids[split]) if split in self.row_ids else n for split, n in rows.items()}
        per_row = seq_len * hidden * self.dtype.itemsize
        self.shard_rows = shard_rows or max(1, SHARD_BYTES // per_row)

    # ----------------------------------------------------------------------------------------- layout
    @property
    def inputs(self) -> Path:
        return self.root / "inputs"

    def input_path(self, split: str, block: Block, shard: int) -> Path:
        return self.inputs / split / f"{block.name}-{shard:05d}.safetensors"

    def weights_path(self, block: Block) -> Path:
        return self.root / f"{block.name}.safetensors"

    def summary_path(self, block: Block) -> Path:
        return self.root / f"{block.name}.json"

    def shards(self, split: str) -> list[tuple[int, int, int]]:
        """``(shard, first row, end row)`` of every shard of ``split``."""
        n = self.rows[split]
        return [(i, a, min(a + self.shard_rows, n)) for i, a in enumerate(range(0, n, self.shard_rows))]

    # ------------------------------------------------------------------------------------------ sizes
    @property
    def tokens(self) -> int:
        return sum(self.rows.values()) * self.seq_len

    def bytes_needed(self, blocks: Sequence[Block]) -> int:
        """``bytes per value x tokens x hidden x blocks``: the inputs of ``blocks``, every split."""
        return self.dtype.itemsize * self.tokens * self.hidden * len(blocks)

    def bytes_present(self, blocks: Sequence[Block]) -> int:
        return sum(p.stat().st_size for b in blocks for split in self.rows
                   for p in (self.inputs / split).glob(f"{b.name}-*.safetensors"))

    # ------------------------------------------------------------------------------------------ state
    def is_trained(self, block: Block) -> bool:
        return self.weights_path(block).exists() and self.summary_path(block).exists()

    def shard_done(self, split: str, shard: int, blocks: Sequence[Block]) -> bool:
        return all(self.input_path(split, b, shard).exists() for b in blocks)

    def manifest(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT, "dtype": self.dtype_name, "seq_len": self.seq_len, "hidden_size": self.hidden,
            "shard_rows": self.shard_rows, "rows": self.rows,
            **({"of_rows": self.source_rows} if self.row_ids else {}),
            "blocks": [{"name": b.name, "layers": [b.start, b.stop]} for b in self.blocks],
            "what": "the raw residual-stream input of each block's first decoder layer",
            **({"scale": "float32 per row, beside the values: input = float8 value x scale"} if self.scaled else {}),
        }

    def complete(self) -> bool:
        """Whether the teacher pass finished (its manifest is written, and matches this cache)."""
        path = self.inputs / "manifest.json"
        if not path.exists():
            return False
        saved = load_json(path)
        if saved != self.manifest():
            raise TrainingError(
                f"{path} describes other stored inputs than this run needs ({_diff(saved, self.manifest())})",
                f"delete {self.inputs} and run again with --resume: the teacher pass recomputes them",
            )
        return True

    def mark_complete(self) -> None:
        save_json(self.inputs / "manifest.json", self.manifest())

    # ------------------------------------------------------------------------------------------ files
    def pack(self, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows of block inputs ``(rows, seq_len, hidden)`` as they are stored: ``{"hidden"}`` in the cache's
        dtype, plus ``{"scale"}`` (float32 per row) for float8. Row by row, so a shard is packed as it arrives."""
        if not self.scaled:
            return {"hidden": hidden.to(self.dtype)}
        values, scale = quantize_rows(hidden)
        return {"hidden": values, "scale": scale}

    def write_shard(self, split: str, shard: int, inputs: dict[int, list[dict[str, torch.Tensor]]],
                    blocks: Sequence[Block]) -> None:
        """Store shard ``shard`` of ``split`` for each of ``blocks``: ``inputs[block start]`` is the shard's rows
        in order, as batches from :meth:`pack`."""
        for b in blocks:
            parts = inputs[b.start]
            save_tensors(self.input_path(split, b, shard), {k: torch.cat([p[k] for p in parts]) for k in parts[0]},
                         metadata={"format": MANIFEST_FORMAT, "block": b.name, "split": split})

    def stored(self, split: str, block: Block) -> StoredRows:
        return StoredRows(self, split, block)

    def drop_inputs(self, block: Block) -> None:
        """Delete ``block``'s stored inputs (it is trained: they are no longer needed)."""
        for split in self.rows:
            for p in (self.inputs / split).glob(f"{block.name}-*.safetensors"):
                p.unlink(missing_ok=True)


def _diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return "; ".join(f"{k}: stored {a.get(k)!r}, needed {b.get(k)!r}" for k in keys[:3])


def check_disk(cache: BlockCache, pending: Sequence[Block], block_size: int, total_blocks: int) -> str:
    """The line that says how much disk the stored inputs of ``pending`` need; TrainingError with the numbers
    when the disk under the cache has less free space than is still to be written."""
    need = cache.bytes_needed(pending)
    still = max(0, need - cache.bytes_present(pending))
    free = free_bytes(cache.root)
    formula = disk_formula(cache.dtype.itemsize, cache.tokens, cache.hidden, len(pending))
    layers = f"{block_size} layer{'s' if block_size > 1 else ''}"
    line = (f"block-wise transfer: {total_blocks} blocks of {layers}; the stored block inputs need "
            f"{human_bytes(need)} ({formula}); {human_bytes(free)} free in {cache.root.parent}")
    if still > free:
        raise TrainingError(
            f"not enough disk for block-wise transfer: the stored block inputs need {human_bytes(need)} ({formula}"
            f"{f', {human_bytes(need - still)} of it already written' if still < need else ''}) but "
            f"{cache.root.parent} has only {human_bytes(free)} free",
            f"free {human_bytes(still - free)} there, choose an --output on a larger disk, or store fewer blocks: "
            f"raise transfer.block_size (now {block_size}) or lower data.max_samples",
        )
    return line


__all__ = ["Block", "BlockCache", "StoredRows", "plan_blocks", "check_disk", "free_bytes", "human_bytes", "DTYPES",
           "quantize_rows", "dequantize_rows", "disk_formula"]
