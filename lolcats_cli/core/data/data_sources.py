"""Reading raw records (dicts of columns) from the places ``data.dataset`` can name.

* ``pydoc``: the help topics of ``pydoc_data.topics`` (ships with CPython), one record per topic, in
  sorted topic order: ``{"topic": ..., "text": ...}``;
* a local ``.json`` (a list of objects, or one key holding such a list), ``.jsonl`` (one object per
  line), ``.parquet`` or ``.txt`` (the whole file as one ``{"text": ...}`` record) file, or a local
  dataset folder (read by ``datasets.load_dataset``);
* a hub dataset id, read by ``datasets.load_dataset(id, split=...)`` after a quick check that it is
  cached or reachable (see ``core/model/hub.py``), so an offline machine fails in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...errors import DataError
from ..model import hub

PYDOC = "pydoc"
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".txt")
Record = dict[str, Any]


def is_local(dataset: str) -> bool:
    """Whether ``dataset`` names a local file or folder (existing or not) rather than a hub id."""
    path = Path(dataset).expanduser()
    return (
        path.exists() or path.suffix.lower() in LOCAL_SUFFIXES or dataset.startswith((".", "/", "~"))
        or dataset.count("/") > 1 or "\\" in dataset
    )


def stream_source(dataset: str) -> bool:
    """Sources made of a few long documents (pydoc, .txt): they hold out by tokens, not by records."""
    return dataset == PYDOC or (is_local(dataset) and Path(dataset).suffix.lower() == ".txt")


def read_records(dataset: str, split: str = "train") -> list[Record]:
    """Every record of ``dataset``, in a fixed order."""
    if dataset == PYDOC:
        from pydoc_data.topics import topics

        return [{"topic": name, "text": topics[name]} for name in sorted(topics)]
    if is_local(dataset):
        return _read_local(Path(dataset).expanduser())
    return _read_hub(dataset, split)


def _read_local(path: Path) -> list[Record]:
    if not path.exists():
        raise DataError(f"data.dataset: no such file or folder: {path}", "check the path (or use 'pydoc' or a hub id)")
    if path.is_dir():
        return _load_dataset(str(path), "train", f"the dataset folder {path}")
    suffix = path.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise DataError(
            f"data.dataset: cannot read {path.name}: unknown extension {suffix or '(none)'!r}",
            f"supported: {', '.join(LOCAL_SUFFIXES)}",
        )
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"data.dataset: cannot read {path}: {e}", "check the file and its permissions (UTF-8 text)") from e
    except Exception as e:  # pyarrow's errors for a broken parquet file
        raise DataError(f"data.dataset: cannot read {path} as parquet: {e}", "check the file") from e
    if suffix == ".txt":
        return [{"text": text}]
    if suffix == ".jsonl":
        return _parse_jsonl(path, text)
    return _parse_json(path, text)


def _parse_jsonl(path: Path, text: str) -> list[Record]:
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"data.dataset: {path}, line {n}: invalid JSON ({e.msg})", "each line must be one JSON object") from e
        if not isinstance(row, dict):
            raise DataError(f"data.dataset: {path}, line {n}: expected a JSON object, got {type(row).__name__}")
        out.append(row)
    return out


def _parse_json(path: Path, text: str) -> list[Record]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"data.dataset: {path}: invalid JSON at line {e.lineno} ({e.msg})", "fix the file") from e
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else data
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(
            f"data.dataset: {path}: expected a list of JSON objects (or one key holding such a list)",
            'e.g. [{"instruction": ..., "input": ..., "output": ...}] or [{"text": ...}]',
        )
    return data


def _read_hub(repo_id: str, split: str) -> list[Record]:
    if not hub.offline("dataset"):
        answer = hub.probe(repo_id, repo_type="dataset")
        if answer.status == "unreachable":
            raise DataError(
                f"data.dataset: cannot reach the Hugging Face Hub to read {repo_id!r} ({answer.detail})",
                "if it was downloaded before, set HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 to read the cache; "
                "otherwise check the network, or use a local .jsonl/.json/.parquet/.txt file or 'pydoc'",
            )
        if answer.status == "not_found":
            raise DataError(f"data.dataset: no dataset {repo_id!r} on the Hugging Face Hub ({answer.detail})",
                            "check the id (owner/name); a private dataset needs HF_TOKEN")
        if answer.status == "gated":
            raise DataError(f"data.dataset: dataset {repo_id!r} is gated or private ({answer.detail})",
                            f"accept its terms on https://huggingface.co/datasets/{repo_id} and export HF_TOKEN=hf_...")
    return _load_dataset(repo_id, split, f"dataset {repo_id!r}")


def _load_dataset(name: str, split: str, what: str) -> list[Record]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except ValueError as e:
        if "split" in str(e).lower():
            raise DataError(f"data.split: {what} has no split {split!r} ({_first_line(e)})", "set data.split") from e
        raise DataError(f"data.dataset: cannot load {what}: {_first_line(e)}") from e
    except (ConnectionError, FileNotFoundError) as e:
        offline = hub.offline("dataset")
        raise DataError(
            f"data.dataset: {what} is not available{' offline' if offline else ''}: {_first_line(e)}",
            "download it once with the network on (unset HF_DATASETS_OFFLINE / HF_HUB_OFFLINE), or use a local file"
            if offline else "check the id and the network, or use a local file",
        ) from e
    except Exception as e:  # datasets raises many kinds (DatasetNotFoundError, builder errors ...)
        raise DataError(f"data.dataset: cannot load {what}: {type(e).__name__}: {_first_line(e)}") from e
    return ds.to_list()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def columns(records: list[Record]) -> list[str]:
    """Column names seen in the first 100 records, in first-seen order."""
    seen: dict[str, None] = {}
    for r in records[:100]:
        seen.update(dict.fromkeys(r))
    return list(seen)


__all__ = ["PYDOC", "LOCAL_SUFFIXES", "Record", "is_local", "stream_source", "read_records", "columns"]
