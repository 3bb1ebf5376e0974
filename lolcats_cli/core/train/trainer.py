"""One training loop for both stages: AdamW on fp32 trainables, gradient accumulation and clipping,
held-out evaluation with keep-the-best, ReduceLROnPlateau / cosine / constant schedules, pickle-free
checkpoints and exact resume.

Resume is exact because everything a step depends on is a function of the step number (the data order of
epoch e is a permutation seeded by ``seed + e``; the global RNG is reseeded with ``seed`` and the step before
every update) or is saved in the checkpoint (trainables, optimizer moments, scheduler, best so far).

Checkpoint layout (``ckpt_dir``): ``step-00000040/{trainable,optimizer}.safetensors`` +
``step-00000040/state.json``; ``latest.json`` names the newest complete step folder and is written last
(the commit point); ``best.safetensors`` holds the best trainables so far. A checkpoint is written at every
evaluation, every ``save_every`` updates and every ``save_every_minutes`` minutes of training. The newest
step folder and the one before it are kept (older ones are pruned), so a damaged checkpoint falls back to
the previous one with a warning naming the bad file.

Ctrl-C raises :class:`TrainingInterrupted` (a KeyboardInterrupt) that says where the run stopped and which
checkpoint it can resume from.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed
from torch import Tensor, nn

from ...errors import TrainingError
from ..progress import EvalInfo, NullReporter, Reporter, StepInfo, phase
from ..recipe.recipe import TrainConfig
from .checkpoint import error_text, find_checkpoint, latest_checkpoint, load_tensors, save_json, save_tensors

log = logging.getLogger(__name__)  # damaged checkpoints and fresh starts; the CLI prints these on stderr

# loss_fn(inputs (b, L, ...), labels (b, L) | None) -> scalar loss; it may raise TrainingError itself to
# name the culprit (a layer, say) of a non-finite loss. The inputs are token ids, or whatever rows the
# trainer's RowSource gives (stored hidden states for block-wise transfer).
LossFn = Callable[[Tensor, "Tensor | None"], Tensor]
# eval_fn() -> (held-out loss, details for the reporter and the history)
EvalFn = Callable[[], "tuple[float, dict[str, Any]]"]
# backward_fn(input_ids, labels, scale) -> the loss, detached, after the backward of scale x the loss has run
BackwardFn = Callable[[Tensor, "Tensor | None", float], Tensor]


class RowSource(Protocol):
    """Training rows the trainer draws micro-batches from: ``num_rows`` sequences of ``seq_len`` tokens each;
    ``take(rows)`` gives the inputs of those rows (a ``(len(rows), seq_len, ...)`` tensor, on any device)."""

    num_rows: int
    seq_len: int

    def take(self, rows: Tensor) -> Tensor: ...


def planned_steps(settings: Any, num_rows: int, seq_len: int) -> int:
    """The updates a run of ``settings`` makes over ``num_rows`` sequences of ``seq_len`` tokens: its epochs,
    capped by ``max_steps`` and ``max_tokens``."""
    s = settings
    steps = math.ceil(s.epochs * math.ceil(num_rows / s.batch_size) / s.grad_accum)
    if s.max_steps is not None:
        steps = min(steps, s.max_steps)
    if s.max_tokens is not None:
        per_step = s.grad_accum * s.batch_size * seq_len
        steps = min(steps, max(1, math.ceil(s.max_tokens / per_step)))
    return max(steps, 1)


def epoch_order(settings: Any, num_rows: int, epoch: int) -> Tensor:
    """The order in which epoch ``epoch`` reads the rows: a permutation seeded by ``seed + epoch``."""
    return torch.randperm(num_rows, generator=torch.Generator().manual_seed(settings.seed + epoch))


def micro_batch_rows(settings: Any, num_rows: int, i: int) -> Tensor:
    """The rows of micro-batch ``i``: the epochs one after another, each in its :func:`epoch_order`."""
    per_epoch = math.ceil(num_rows / settings.batch_size)
    epoch, j = divmod(i % (settings.epochs * per_epoch), per_epoch)
    return epoch_order(settings, num_rows, epoch)[j * settings.batch_size : (j + 1) * settings.batch_size]


def rows_read(settings: Any, num_rows: int, seq_len: int) -> Tensor:
    """Every row a run of ``settings`` reads (sorted): all of them once it reaches a whole epoch, else the
    first micro-batches of the first epoch's order. Block-wise transfer stores the inputs of these rows only."""
    rows = planned_steps(settings, num_rows, seq_len) * settings.grad_accum * settings.batch_size
    if rows >= num_rows:
        return torch.arange(num_rows)
    return epoch_order(settings, num_rows, 0)[:rows].sort().values


class TensorRows:
    """A :class:`RowSource` over a tensor held in memory (token ids ``(N, L)``, say)."""

    def __init__(self, data: Tensor) -> None:
        if data.ndim < 2 or data.shape[0] == 0:
            raise TrainingError(f"no training sequences (got input_ids of shape {tuple(data.shape)})")
        self.data = data
        self.num_rows, self.seq_len = int(data.shape[0]), int(data.shape[1])

    def take(self, rows: Tensor) -> Tensor:
        return self.data[rows]


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :meth:`Trainer.fit`: ``step`` updates of ``total_steps`` were done; ``checkpoint`` is the
    newest complete checkpoint folder (None if none was written) and ``checkpoint_step`` its step."""

    def __init__(self, title: str, step: int, total_steps: int, checkpoint: Path | None,
                 checkpoint_step: int | None) -> None:
        where = f"the last checkpoint is step {checkpoint_step} ({checkpoint})" if checkpoint else "no checkpoint yet"
        super().__init__(f"{title} interrupted at step {step}/{total_steps}; {where}")
        self.title, self.step, self.total_steps = title, step, total_steps
        self.checkpoint, self.checkpoint_step = checkpoint, checkpoint_step


@dataclasses.dataclass
class FitResult:
    steps: int
    tokens: int
    wall_time_s: float
    best_loss: float | None
    best_step: int | None
    history: list[dict[str, Any]]


class Trainer:
    """Trains ``params`` (name -> Parameter) on ``input_ids`` ``(N, L)`` or any :class:`RowSource` (+ optional
    ``labels`` ``(N, L)``)."""

    def __init__(
        self,
        params: Mapping[str, nn.Parameter],
        settings: TrainConfig,
        input_ids: Tensor | RowSource,
        loss_fn: LossFn,
        eval_fn: EvalFn,
        ckpt_dir: Path,
        *,
        labels: Tensor | None = None,
        reporter: Reporter | None = None,
        title: str = "training",
        device: torch.device | str = "cpu",
        ranks: tuple[int, int] = (0, 1),
        backward_fn: BackwardFn | None = None,
    ) -> None:
        """``ranks``: ``(rank, world)`` of a data-parallel run (torch.distributed initialised): every rank takes
        its share of each update's micro-batches, the trainables' gradients are summed over the ranks, and
        only rank 0 writes checkpoints; every rank runs the evaluations (the model may be sharded).
        ``backward_fn(ids, labels, scale)``: runs a micro-batch's forward and the backward of ``scale`` x its loss
        itself and returns the loss (detached), instead of ``loss_fn`` and one backward here (stage 1 runs each
        layer's backward as soon as that layer's loss exists)."""
        rows = TensorRows(input_ids) if isinstance(input_ids, Tensor) else input_ids
        if rows.num_rows == 0:
            raise TrainingError("no training sequences (the row source is empty)")
        self.params = dict(params)
        self.s = settings
        self.rows, self.labels = rows, labels
        self.loss_fn, self.eval_fn, self.backward_fn = loss_fn, eval_fn, backward_fn
        self.ckpt_dir = Path(ckpt_dir)
        self.reporter = reporter or NullReporter()
        self.title = title
        self.device = torch.device(device)
        self.rank, self.world = ranks
        self.opt = torch.optim.AdamW(list(self.params.values()), lr=settings.lr, weight_decay=settings.weight_decay)
        self.plateau = (
            torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.opt, factor=settings.plateau_factor, patience=settings.plateau_patience
            )
            if settings.scheduler == "plateau"
            else None
        )
        n = rows.num_rows
        self.total_micro = settings.epochs * math.ceil(n / settings.batch_size)
        self.total_steps = planned_steps(settings, n, rows.seq_len)
        self._last_loss = float("nan")
        self._saved: tuple[Path, int] | None = None  # (folder, step) of the newest complete checkpoint
        self._step = 0  # updates done (what an interruption reports)

    def _micro_batch(self, i: int) -> tuple[Tensor, Tensor | None]:
        """Micro-batch ``i`` of the stream (:func:`micro_batch_rows`)."""
        rows = micro_batch_rows(self.s, self.rows.num_rows, i)
        ids = self.rows.take(rows).to(self.device)
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

    def _write_error(self, err: OSError, what: str) -> TrainingError:
        """A TrainingError for a failed write that names the directory and the checkpoint kept."""
        kept = (
            f"the last good checkpoint (step {self._saved[1]}, {self._saved[0]}) is kept; "
            if self._saved else "no checkpoint was written yet; "
        )
        again = "run again with --resume" if self._saved else "run again"
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            return TrainingError(f"the disk is full: cannot write {what} in {self.ckpt_dir}",
                                 f"{kept}free some space on that disk and {again}")
        return TrainingError(f"cannot write {what} in {self.ckpt_dir}: {err.strerror or err}",
                             f"{kept}fix the problem and {again}")

    def _save(self, state: dict) -> None:
        if self.rank != 0:
            return
        folder = self.ckpt_dir / f"step-{state['step']:08d}"
        try:
            save_tensors(folder / "trainable.safetensors", self.params)
            names = list(self.params)
            moments = {}
            for idx, st in self.opt.state_dict()["state"].items():
                for key, value in st.items():
                    moments[f"{names[idx]}::{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
            save_tensors(folder / "optimizer.safetensors", moments)
            save_json(folder / "state.json", state)
            save_json(self.ckpt_dir / "latest.json", {"folder": folder.name, "step": state["step"]})
        except OSError as e:
            if self._saved is None or folder != self._saved[0]:
                shutil.rmtree(folder, ignore_errors=True)  # the half-written folder, to give the space back
            raise self._write_error(e, f"the checkpoint of step {state['step']}") from e
        keep = {folder.name} | ({self._saved[0].name} if self._saved else set())
        self._saved = (folder, state["step"])
        for old in self.ckpt_dir.glob("step-*"):  # keep this checkpoint and the previous one
            if old.is_dir() and old.name not in keep:
                shutil.rmtree(old, ignore_errors=True)

    def _load(self) -> dict | None:
        """Load the newest readable checkpoint into the trainables and the optimizer; its state, or None."""
        found = find_checkpoint(self.ckpt_dir)
        if found is None:
            return None
        folder, state, saved = found.folder, found.state, found.trainable
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
        opt_state: dict[int, dict[str, Tensor]] = {}
        for key, value in found.moments.items():
            pname, field = key.split("::")
            # a copy: the loaded tensors map the file, which pruning deletes later; a mapping would keep its
            # disk space taken for the rest of the run
            opt_state.setdefault(names.index(pname), {})[field] = value.clone()
        groups = [dict(g, params=self.opt.state_dict()["param_groups"][i]["params"]) for i, g in enumerate(state["param_groups"])]
        self.opt.load_state_dict({"state": opt_state, "param_groups": groups})
        if self.plateau is not None and state["plateau"] is not None:
            self.plateau.load_state_dict(state["plateau"])
        self._saved = (folder, state["step"])
        return state

    def _save_best(self) -> None:
        if self.rank != 0:
            return
        try:
            save_tensors(self.ckpt_dir / "best.safetensors", self.params)
        except OSError as e:
            raise self._write_error(e, "best.safetensors") from e

    def restore_best(self) -> bool:
        """Load the best trainables saved so far into the parameters; False if there are none."""
        path = self.ckpt_dir / "best.safetensors"
        if not path.exists():
            return False
        try:
            best = load_tensors(path)
        except Exception as e:  # noqa: BLE001 -- a damaged file, whatever the library raises
            raise TrainingError(
                f"{path} (the best trainables so far) is unreadable ({error_text(e)})",
                "restore it from a backup, or delete it and run again with --resume to keep the last "
                "evaluated trainables instead",
            ) from e
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
        """Train to ``total_steps``; with ``resume``, from the newest readable checkpoint (from step 0 if the
        run stopped before writing one). Ctrl-C raises :class:`TrainingInterrupted`."""
        try:
            return self._fit(resume)
        except KeyboardInterrupt as stop:
            # what --resume will use: latest.json on disk (Ctrl-C may land between writing it and noting it)
            found = latest_checkpoint(self.ckpt_dir)
            folder, saved_step = (found[0], found[1]["step"]) if found else self._saved or (None, None)
            raise TrainingInterrupted(self.title, self._step, self.total_steps, folder, saved_step) from stop
        finally:
            self.reporter.finish()

    def _fit(self, resume: bool) -> FitResult:
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        state = self._load() if resume else None
        if resume and state is None:
            log.warning(f"{self.ckpt_dir} holds no checkpoint yet (the run stopped before its first one): "
                        f"starting {self.title} from step 0")
        if state is not None:
            step, tokens, elapsed, history = state["step"], state["tokens"], state["elapsed_s"], state["history"]
            best = None if state["best_loss"] is None else (state["best_loss"], state["best_step"])
            self.reporter.log(f"resuming {self.title} at step {step}/{self.total_steps}")
        else:
            step, tokens, elapsed, history, best = 0, 0, 0.0, [], None
            with phase(f"step 0: evaluating {self.title} on the held-out sequences before training"):
                best = self._evaluate(0, best, history)
            self._save(self._state(step, tokens, elapsed, best, history))

        self._step = step
        self.reporter.start(self.title, self.total_steps, step)
        session_start, session_tokens = time.perf_counter(), 0
        last_save = time.monotonic()
        save_seconds = None if self.s.save_every_minutes is None else 60.0 * self.s.save_every_minutes
        while step < self.total_steps:
            step_tokens = self._update(step)
            step += 1
            self._step = step
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
            every_n = bool(self.s.save_every) and step % self.s.save_every == 0
            timed = save_seconds is not None and time.monotonic() - last_save >= save_seconds
            if evaluate or every_n or timed:
                total_elapsed = elapsed + time.perf_counter() - session_start
                self._save(self._state(step, tokens, total_elapsed, best, history))
                last_save = time.monotonic()
        elapsed += time.perf_counter() - session_start
        if self.world > 1:
            torch.distributed.barrier()  # rank 0's files (best.safetensors) are written before anyone reads them
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
        # This rank's share; a rank short of one runs a zero-weight micro-batch so that every rank makes the
        # same forward and backward passes (a sharded model all-gathers in each).
        mine: list[int | None] = list(micro[self.rank :: self.world])
        mine += [None] * (math.ceil(len(micro) / self.world) - len(mine))
        self.opt.zero_grad(set_to_none=True)
        total, tokens = 0.0, 0
        for i in mine:
            ids, labels = self._micro_batch(micro[0] if i is None else i)
            if self.backward_fn is not None:  # forward and backward in one call
                loss = self.backward_fn(ids, labels, 0.0 if i is None else 1.0 / len(micro))
                self._check_finite(loss, step)
            else:
                loss = self.loss_fn(ids, labels)
                self._check_finite(loss, step)
                (loss * 0.0 if i is None else loss / len(micro)).backward()
            if i is None:
                continue
            total += loss.item() / len(micro)
            tokens += ids.shape[0] * self.rows.seq_len
        if self.world > 1:
            total, tokens = self._sum_over_ranks(total, tokens)
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

    def _check_finite(self, loss: Tensor, step: int) -> None:
        if not torch.isfinite(loss):
            raise TrainingError(
                f"the loss became {loss.item()} at step {step + 1}",
                f"the last good checkpoint is kept in {self.ckpt_dir}; lower the learning rate and --resume",
            )

    def _sum_over_ranks(self, total: float, tokens: int) -> tuple[float, int]:
        """Sum the trainables' gradients, the loss and the tokens over the ranks (in the same order on each)."""
        for p in self.params.values():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
        both = torch.tensor([total, float(tokens)], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(both)
        return float(both[0]), int(both[1])
