"""The Hugging Face Hub, asked quickly: is a repo cached, is the hub reachable, does the repo exist.

transformers and datasets retry an unreachable hub for 20 to 50 seconds before failing. lolcats asks first,
with one bounded call (:func:`probe`), so that a missing model or dataset fails in seconds with an error
that names the repo and the fix. ``HF_HUB_OFFLINE=1`` (or ``HF_DATASETS_OFFLINE=1`` for datasets) skips
the network entirely.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Literal

from ...switches import ON

PROBE_TIMEOUT_S = 5.0

Status = Literal["ok", "unreachable", "not_found", "gated", "bad_revision", "offline"]


@dataclasses.dataclass(frozen=True)
class HubStatus:
    """What the hub said about a repo: ``status`` and, for errors, a one-line ``detail``."""

    status: Status
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def offline(repo_type: str = "model") -> bool:
    """Whether the user asked for offline mode (HF_HUB_OFFLINE, or HF_DATASETS_OFFLINE for datasets)."""
    names = ["HF_HUB_OFFLINE"] + (["HF_DATASETS_OFFLINE"] if repo_type == "dataset" else [])
    if any(os.environ.get(n, "").strip().lower() in ON for n in names):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return False


def cached_file(repo_id: str, filename: str, revision: str | None = None, repo_type: str = "model") -> str | None:
    """The local path of ``filename`` of ``repo_id`` in the hub cache, or None (never touches the network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, filename, revision=revision, repo_type=repo_type)
    except Exception:  # an invalid repo id, say: not cached
        return None
    return found if isinstance(found, str) else None


def probe(repo_id: str, revision: str | None = None, repo_type: str = "model",
          timeout: float = PROBE_TIMEOUT_S) -> HubStatus:
    """Ask the hub about ``repo_id`` once, giving up after ``timeout`` seconds (uses HF_TOKEN if set)."""
    if offline(repo_type):
        return HubStatus("offline", "offline mode is set (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)")
    result: list[HubStatus] = []

    def ask() -> None:
        result.append(_ask(repo_id, revision, repo_type, timeout))

    worker = threading.Thread(target=ask, name="lolcats-hub-probe", daemon=True)
    worker.start()
    worker.join(timeout + 1.0)
    if not result:
        return HubStatus("unreachable", f"no answer from the hub within {timeout + 1.0:.0f} s")
    return result[0]


def _ask(repo_id: str, revision: str | None, repo_type: str, timeout: float) -> HubStatus:
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hf

    api = HfApi()
    info = api.dataset_info if repo_type == "dataset" else api.model_info
    try:
        info(repo_id, revision=revision, timeout=timeout)
    except hf.GatedRepoError as e:
        return HubStatus("gated", _first_line(e))
    except hf.RevisionNotFoundError as e:
        return HubStatus("bad_revision", _first_line(e))
    except (hf.RepositoryNotFoundError, hf.HFValidationError) as e:
        return HubStatus("not_found", _first_line(e))
    except hf.OfflineModeIsEnabled as e:
        return HubStatus("offline", _first_line(e))
    except hf.HfHubHTTPError as e:
        code = getattr(getattr(e, "response", None), "status_code", None)
        if code in (401, 403):
            return HubStatus("gated", _first_line(e))
        return HubStatus("unreachable", _first_line(e))
    except Exception as e:  # connection refused, DNS failure, TLS, proxy ...
        return HubStatus("unreachable", f"{type(e).__name__}: {_first_line(e)}")
    return HubStatus("ok")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


__all__ = ["HubStatus", "offline", "cached_file", "probe", "PROBE_TIMEOUT_S"]
