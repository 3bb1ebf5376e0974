"""One training loop for both stages: AdamW on fp32 trainables, gradient accumulation and clipping,
held-out evaluation with keep-the-best, ReduceLROnPlateau / cosine / constant schedules, pickle-free
checkpoints and exact resume.

Resume is exact because everything a step depends on is a function of the step number (the data order of
epoch e is a permutation seeded by ``seed + e``; the global RNG is reseeded with ``seed`` and the step before
every update) or is saved in the checkpoint (trainables, optimizer moments, scheduler, best so far).

Checkpoint layout (``ckpt_dir``): ``step-00000040/{trainable,optimizer}.safetensors`` +
``step-00000040/state.json``; ``latest.json`` names the newest complete step folder and is written last
(the commit point); ``best.safetensors`` holds the best trainables so far. Older step folders are pruned.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import TrainingError
from .checkpoint import load_json, load_tensors, save_json, save_tensors
from .progress import EvalInfo, NullReporter, Reporter, StepInfo

# loss_fn(input_ids (b, L), labels (b, L) | None) -> scalar loss; it may raise TrainingError itself to
# name the culprit (a layer, say) of a non-finite loss.
LossFn = Callable[[Tensor, "Tensor | None"], Tensor]
# eval_fn() -> (held-out loss, details for the reporter and the history)
EvalFn = Callable[[], "tuple[float, dict[str, Any]]"]


@dataclasses.dataclass
class TrainSettings:
    lr: float
    weight_decay: float = 0.0
    batch_size: int = 1
    grad_accum: int = 8
    epochs: int = 2
    max_steps: int | None = None
    max_tokens: int | None = None
    eval_every: int = 100
    scheduler: str = "plateau"
    plateau_factor: float = 0.1
    plateau_patience: int = 10
    grad_clip: float | None = 1.0
    seed: int = 0
    save_every: int | None = None

    @classmethod
    def from_section(cls, section: Any) -> TrainSettings:
        """Take the fields of this class from a recipe section (a dataclass or a mapping)."""
        data = section if isinstance(section, Mapping) else vars(section)
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def latest_checkpoint(ckpt_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """``(step folder, state)`` of the newest complete checkpoint in ``ckpt_dir``, or None."""
    pointer = Path(ckpt_dir) / "latest.json"
    if not pointer.exists():
        return None
    folder = Path(ckpt_dir) / load_json(pointer)["folder"]
    return folder, load_json(folder / "state.json")


@dataclasses.dataclass
class FitResult:
    steps: int
    tokens: int
    wall_time_s: float
    best_loss: float | None
    best_step: int | None
    history: list[dict[str, Any]]


class Trainer:
    """Trains ``params`` (name -> Parameter) on ``input_ids`` ``(N, L)`` (+ optional ``labels``)."""

    def __init__(
        self,
        params: Mapping[str, nn.Parameter],
        settings: TrainSettings,
        input_ids: Tensor,
        loss_fn: LossFn,
        eval_fn: EvalFn,
        ckpt_dir: Path,
        *,
        labels: Tensor | None = None,
        reporter: Reporter | None = None,
        title: str = "training",
        device: torch.device | str = "cpu",
    ) -> None:
        if input_ids.ndim != 2 or input_ids.shape[0] == 0:
            raise TrainingError(f"no training sequences (got input_ids of shape {tuple(input_ids.shape)})")
        self.params = dict(params)
        self.s = settings
        self.input_ids, self.labels = input_ids, labels
        self.loss_fn, self.eval_fn = loss_fn, eval_fn
        self.ckpt_dir = Path(ckpt_dir)
        self.reporter = reporter or NullReporter()
        self.title = title
        self.device = torch.device(device)
        self.opt = torch.optim.AdamW(list(self.params.values()), lr=settings.lr, weight_decay=settings.weight_decay)
        self.plateau = (
            torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.opt, factor=settings.plateau_factor, patience=settings.plateau_patience
            )
            if settings.scheduler == "plateau"
            else None
        )
        n = input_ids.shape[0]
        self.micro_per_epoch = math.ceil(n / settings.batch_size)
        self.total_micro = settings.epochs * self.micro_per_epoch
        self.total_steps = self._plan_steps()
        self._last_loss = float("nan")

    # ----------------------------------------------------------------------------------------- planning
    def _plan_steps(self) -> int:
        s = self.s
        steps = math.ceil(self.total_micro / s.grad_accum)
        if s.max_steps is not None:
            steps = min(steps, s.max_steps)
        if s.max_tokens is not None:
            per_step = s.grad_accum * s.batch_size * self.input_ids.shape[1]
            steps = min(steps, max(1, math.ceil(s.max_tokens / per_step)))
        return max(steps, 1)

    def _micro_batch(self, i: int) -> tuple[Tensor, Tensor | None]:
        """Micro-batch ``i`` of the stream: the epochs one after another, each in its own seeded order."""
        epoch, j = divmod(i % self.total_micro, self.micro_per_epoch)
        order = torch.randperm(self.input_ids.shape[0], generator=torch.Generator().manual_seed(self.s.seed + epoch))
        rows = order[j * self.s.batch_size : (j + 1) * self.s.batch_size]
        ids = self.input_ids[rows].to(self.device)
        labels = None if self.labels is None else self.labels[rows].to(self.device)
        return ids, labels

    def _lr_at(self, step: int) -> float | None:
        """The learning rate of update ``step`` for the step-driven schedules (None: plateau drives it)."""
        if self.s.scheduler == "cosine":
            return self.s.lr * 0.5 * (1 + math.cos(math.pi * step / self.total_steps))
        if self.s.scheduler == "constant":
            return self.s.lr
        return None

    # -------------------------------------------------------------------------------------------- state
    def _state(self, step: int, tokens: int, elapsed: float, best: tuple[float, int] | None, history: list) -> dict:
        return {
            "step": step,
            "tokens": tokens,
            "elapsed_s": elapsed,
            "best_loss": None if best is None else best[0],
            "best_step": None if best is None else best[1],
            "history": history,
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.opt.param_groups],
            "plateau": None if self.plateau is None else self.plateau.state_dict(),
        }

    def _save(self, state: dict) -> None:
        folder = self.ckpt_dir / f"step-{state['step']:08d}"
        save_tensors(folder / "trainable.safetensors", self.params)
        names = list(self.params)
        moments = {}
        for idx, st in self.opt.state_dict()["state"].items():
            for key, value in st.items():
                moments[f"{names[idx]}::{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
        save_tensors(folder / "optimizer.safetensors", moments)
        save_json(folder / "state.json", state)
        save_json(self.ckpt_dir / "latest.json", {"folder": folder.name, "step": state["step"]})
        for old in self.ckpt_dir.glob("step-*"):
            if old.is_dir() and old.name != folder.name:
                shutil.rmtree(old, ignore_errors=True)

    def _load(self) -> dict:
        latest = latest_checkpoint(self.ckpt_dir)
        if latest is None:
            raise TrainingError(
                f"nothing to resume: {self.ckpt_dir} has no complete checkpoint",
                "start the run again without --resume (add --overwrite to replace the folder)",
            )
        folder, state = latest
        saved = load_tensors(folder / "trainable.safetensors")
        missing = sorted(set(self.params) - set(saved))
        if missing:
            raise TrainingError(
                f"checkpoint {folder} does not match this run: missing {missing[:3]}",
                "resume with the same recipe the run started with (see recipe.resolved.yaml)",
            )
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(saved[name].to(p.device, p.dtype))
        names = list(self.params)
        moments = load_tensors(folder / "optimizer.safetensors")
        opt_state: dict[int, dict[str, Tensor]] = {}
        for key, value in moments.items():
            pname, field = key.split("::")
            opt_state.setdefault(names.index(pname), {})[field] = value
        groups = [dict(g, params=self.opt.state_dict()["param_groups"][i]["params"]) for i, g in enumerate(state["param_groups"])]
        self.opt.load_state_dict({"state": opt_state, "param_groups": groups})
        if self.plateau is not None and state["plateau"] is not None:
            self.plateau.load_state_dict(state["plateau"])
        return state

    def _save_best(self) -> None:
        save_tensors(self.ckpt_dir / "best.safetensors", self.params)

    def restore_best(self) -> bool:
        """Load the best trainables saved so far into the parameters; False if there are none."""
        path = self.ckpt_dir / "best.safetensors"
        if not path.exists():
            return False
        best = load_tensors(path)
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(best[name].to(p.device, p.dtype))
        return True

    # ---------------------------------------------------------------------------------------------- fit
    def _evaluate(self, step: int, best: tuple[float, int] | None, history: list) -> tuple[float, int] | None:
        loss, details = self.eval_fn()
        is_best = math.isfinite(loss) and (best is None or loss < best[0])
        if is_best:
            best = (loss, step)
            self._save_best()
        if self.plateau is not None and step > 0:
            self.plateau.step(loss)
        history.append({"step": step, "loss": loss, "lr": self.opt.param_groups[0]["lr"], **details})
        self.reporter.evaluated(EvalInfo(step=step, loss=loss, best=is_best, details=details))
        return best

    def fit(self, resume: bool = False) -> FitResult:
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            state = self._load()
            step, tokens, elapsed, history = state["step"], state["tokens"], state["elapsed_s"], state["history"]
            best = None if state["best_loss"] is None else (state["best_loss"], state["best_step"])
            self.reporter.log(f"resuming {self.title} at step {step}/{self.total_steps}")
        else:
            step, tokens, elapsed, history, best = 0, 0, 0.0, [], None
            best = self._evaluate(0, best, history)
            self._save(self._state(step, tokens, elapsed, best, history))

        self.reporter.start(self.title, self.total_steps, step)
        session_start, session_tokens = time.perf_counter(), 0
        while step < self.total_steps:
            step_tokens = self._update(step)
            step += 1
            tokens += step_tokens
            session_tokens += step_tokens
            now = time.perf_counter()
            self.reporter.step(
                StepInfo(step, self.total_steps, tokens, session_tokens / max(now - session_start, 1e-9),
                         self._last_loss, self.opt.param_groups[0]["lr"])
            )
            evaluate = step % self.s.eval_every == 0 or step == self.total_steps
            if evaluate:
                best = self._evaluate(step, best, history)
            if evaluate or (self.s.save_every and step % self.s.save_every == 0):
                total_elapsed = elapsed + time.perf_counter() - session_start
                self._save(self._state(step, tokens, total_elapsed, best, history))
        self.reporter.finish()
        elapsed += time.perf_counter() - session_start
        return FitResult(step, tokens, elapsed, None if best is None else best[0], None if best is None else best[1], history)

    def _update(self, step: int) -> int:
        """One optimizer update over ``grad_accum`` micro-batches; returns the tokens it consumed."""
        torch.manual_seed(self.s.seed * 1_000_003 + step)
        lr = self._lr_at(step)
        if lr is not None:
            for g in self.opt.param_groups:
                g["lr"] = lr
        first = step * self.s.grad_accum
        micro = range(first, min(first + self.s.grad_accum, self.total_micro))
        self.opt.zero_grad(set_to_none=True)
        total, tokens = 0.0, 0
        for i in micro:
            ids, labels = self._micro_batch(i)
            loss = self.loss_fn(ids, labels)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"the loss became {loss.item()} at step {step + 1}",
                    f"the last good checkpoint is kept in {self.ckpt_dir}; lower the learning rate and --resume",
                )
            (loss / len(micro)).backward()
            total += loss.item() / len(micro)
            tokens += ids.numel()
        if self.s.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.s.grad_clip)
            if not torch.isfinite(norm):
                raise TrainingError(
                    f"the gradient norm became {norm.item()} at step {step + 1}",
                    f"the last good checkpoint is kept in {self.ckpt_dir}; lower the learning rate and --resume",
                )
        self.opt.step()
        self._last_loss = total
        return tokens
