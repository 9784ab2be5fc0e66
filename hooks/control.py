"""Commands from the daemon, applied at a step boundary, at the same step on every rank.

The sender thread hands each COMMAND to :meth:`Control.receive`, which only queues it. The
training thread calls :meth:`Control.at_step_end` after every optimizer step and
:meth:`Control.at_step_start` before the next step's first forward; commands are applied
there, in the order the daemon made them, each ``(origin, id)`` once, and acknowledged with
an event.

Under ``torch.distributed`` every ``every`` steps the ranks agree on what to apply: one
all-reduce of a single CPU integer ("has anyone a command?") over a gloo group, and only
when someone has, an ``all_gather_object`` of the commands. Nothing touches the GPU, so no
host-device sync is added; the cost is one tiny CPU collective every ``every`` steps. A
single process checks its queue every step (a ``deque`` length: free).

The ranks also agree on whether each command worked: after applying one, an
``all_gather`` of one CPU integer per rank (its success) over the same group, so every rank
learns which ranks failed (an ``all_reduce(MIN)`` would say only that one did; the names
go to the daemon, which may not see the other nodes' ranks). If any rank failed a command
that changes training state, every rank stays paused: no rank trains on while another did
not rewind. After a rewind that some ranks applied and others did not, their weights
differ, so a ``resume`` is refused on every rank until a rewind succeeds everywhere. Each
rank reports its own outcome and the agreed one (``all_ranks``). This costs one tiny CPU
collective per command applied, never in steady state.

Where a host sync would creep in: a rewind loads tensors and a batch dump copies them to
the host. Both happen only while the run is paused for an incident, never in steady state.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from runwatch.daemon import checkpoints
from runwatch.daemon.protocol import STATEFUL_ACTIONS, shard_id
from runwatch.hooks import checkpoint as ckpt_io

if TYPE_CHECKING:
    from runwatch.hooks.watch import Watch

log = logging.getLogger("runwatch.hooks")

HEARTBEAT_SECONDS = 5.0
#: Commands applied on the sender thread as soon as they arrive, not at a step boundary.
IMMEDIATE = frozenset({"dump_stacks"})
#: Commands that change training state: a failure on any rank keeps every rank paused.


class CommandFailed(Exception):
    """A command this rank could not apply; the message goes back to the daemon."""


@dataclass
class Skipped:
    """Data the run did not train on because it was told to skip it (never quietly)."""

    batches: int = 0
    samples: int = 0
    tokens: int = 0


class Control:
    def __init__(self, watch: Watch, every: int, group: Any = None, distributed: bool = False,
                 poll_seconds: float = 0.05) -> None:
        self.watch = watch
        self.every = max(1, every)
        self.group = group
        self.distributed = distributed
        self.poll_seconds = poll_seconds if not distributed else max(poll_seconds, 0.2)
        self.inbox: deque[dict[str, Any]] = deque()
        self.agreed: list[dict[str, Any]] = []
        self.done: set[tuple[str, int]] = set()
        self.paused = False
        self.paused_seconds = 0.0
        self.lr_scale = 1.0
        self.rewinds = 0
        self.skip_next = 0
        self.skip_shards: set[int] = set()
        self.skipped = Skipped()
        # The LR factor in force when each framework checkpoint was registered (HF's and
        # Lightning's files do not record it, runwatch's do): a later rewind to one of them
        # must not scale its already-scaled rates again.
        self.scale_at_save: dict[str, float] = {}
        self.data_consumer = False  # set once the loop draws batches through watch.data()
        self.done_now: set[tuple[str, int]] = set()  # immediate commands (sender thread only)
        # Why the ranks' training states differ (a rewind that failed on some ranks), or None.
        self.diverged: str | None = None

    # -- sender thread -----------------------------------------------------------------

    def receive(self, command: dict[str, Any]) -> None:
        if command.get("action") in IMMEDIATE:
            self._now(command)
        else:
            self.inbox.append(command)

    def _now(self, command: dict[str, Any]) -> None:
        """Apply a command on this (sender) thread at once: it must work while the training
        thread is stuck, inside a collective or anywhere else."""
        key = _key(command)
        if key in self.done_now:
            return
        self.done_now.add(key)
        try:
            result = dump_stacks(self.watch, command.get("args") or {}, command)
        except Exception as exc:  # never let a dump take the sender thread down
            log.error("runwatch: %s (command %s) failed: %r", command.get("action"), key, exc)
            self._ack(command, "failed", self.watch.step, {}, repr(exc))
        else:
            self._ack(command, "applied", self.watch.step, result, "")

    # -- training thread ---------------------------------------------------------------

    def _drain(self) -> list[dict[str, Any]]:
        out = []
        while self.inbox:
            c = self.inbox.popleft()
            if _key(c) not in self.done and all(_key(c) != _key(a) for a in self.agreed + out):
                out.append(c)
        return out

    def at_step_end(self, step: int) -> None:
        """After optimizer step ``step``: take in commands (agreeing on them every ``every``
        steps under torch.distributed)."""
        if not self.distributed:
            if self.inbox:
                self.agreed += self._drain()
        elif step % self.every == 0:
            self.agreed += self._agree(self._drain())

    def at_step_start(self) -> None:
        """Before the next step's first forward: apply what was agreed; block while paused."""
        if not self.agreed and not self.paused:
            return
        self._apply_agreed()
        if not self.paused:
            return
        started = time.monotonic()
        beat = 0.0
        while self.paused:
            now = time.monotonic()
            if now - beat >= HEARTBEAT_SECONDS:
                self.watch.sender.put_event({"type": "heartbeat", "step": self.watch.step, "paused": True})
                beat = now
            time.sleep(self.poll_seconds)
            # While paused every rank loops here in lockstep, so the agreement stays collective.
            self.agreed += self._agree(self._drain()) if self.distributed else self._drain()
            self._apply_agreed()
        self.paused_seconds += time.monotonic() - started

    def _agree(self, local: list[dict[str, Any]]) -> list[dict[str, Any]]:
        dist = torch.distributed
        flag = torch.tensor([len(local)], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        if int(flag.item()) == 0:  # a CPU tensor: .item() waits for gloo, not for the GPU
            return []
        gathered: list[list[dict[str, Any]] | None] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(gathered, local, group=self.group)
        union: dict[tuple[str, int], dict[str, Any]] = {}
        for commands in gathered:
            for c in commands or []:
                if _key(c) not in self.done:
                    union.setdefault(_key(c), c)
        return sorted(union.values(), key=lambda c: (float(c.get("created", 0.0)), *_key(c)))

    def _apply_agreed(self) -> None:
        agreed, self.agreed = self.agreed, []
        for command in agreed:
            key = _key(command)
            if key in self.done:
                continue
            self.done.add(key)
            action = command.get("action")
            step = self.watch.step
            state, result, detail = "applied", {}, ""
            before = (self.lr_scale, self.rewinds, self.skip_next)
            try:
                handler = self._handlers().get(str(action))
                if handler is None:
                    raise CommandFailed(f"unknown action {action!r}")
                result = handler(command.get("args") or {}, command)
            except Exception as exc:  # a failed command is reported, never raised into training
                known = isinstance(exc, CommandFailed | checkpoints.CheckpointError)
                state, detail = "failed", str(exc) if known else repr(exc)
                log.error("runwatch: %s (command %s) failed: %s", action, key, detail)
            # Every rank reaches this point for every agreed command (a failure is caught above),
            # so the outcome's collective cannot leave a rank behind.
            failed = self._agree_outcome(state == "applied") if self.distributed else \
                ([] if state == "applied" else [self.watch.rank])
            self._settle(str(action), key, failed)
            if failed and action == "rewind" and state == "applied":
                # Not applied as far as the run is concerned: the next rewind must scale the LR
                # and count from the same place on every rank, or their LRs would differ too.
                self.lr_scale, self.rewinds, self.skip_next = before
            if state == "applied" and not failed:
                log.warning("runwatch: %s applied before step %d (command %s)", action, step, key)
            elif state == "applied":
                log.error("runwatch: %s (command %s) failed on rank(s) %s; %s", action, key, failed,
                          "every rank stays paused" if action in STATEFUL_ACTIONS else "training goes on")
            size = self._size()
            self._ack(command, state, step, result, detail,
                      {"failed": failed, "size": size} if self.distributed else None)

    def _size(self) -> int:
        return torch.distributed.get_world_size(self.group) if self.distributed else 1

    def _agree_outcome(self, ok: bool) -> list[int]:
        """The ranks (of the control group: global ranks) where the command failed; the same
        list on every rank."""
        dist = torch.distributed
        flags = [torch.zeros(1, dtype=torch.int64) for _ in range(self._size())]
        dist.all_gather(flags, torch.tensor([int(ok)], dtype=torch.int64), group=self.group)
        return [r for r, f in enumerate(flags) if int(f.item()) == 0]

    def _settle(self, action: str, key: tuple[str, int], failed: list[int]) -> None:
        """After the ranks agreed on a command's outcome: keep every rank paused if it failed
        anywhere and changes training state; note or clear a divergence of the ranks' states."""
        if not failed:
            if action == "rewind":
                self.diverged = None  # every rank loaded the same checkpoint: one state again
            return
        if action in STATEFUL_ACTIONS:
            self.paused = True
        if action == "rewind" and len(failed) < self._size():
            self.diverged = (f"rewind (command {key[1]} from {key[0]}) failed on rank(s) "
                             f"{', '.join(map(str, failed))} and was applied on the others")

    def _ack(self, command: dict[str, Any], state: str, step: int, result: dict[str, Any],
             detail: str, all_ranks: dict[str, Any] | None = None) -> None:
        """Report this rank's outcome (and, under torch.distributed, the one all ranks agreed)."""
        event = {"type": "command", "origin": command.get("origin"), "id": command.get("id"),
                 "action": command.get("action"), "state": state, "step": step, "result": result,
                 "detail": detail}
        if all_ranks is not None:
            event["all_ranks"] = all_ranks
        self.watch.sender.put_event(event)

    def _handlers(self) -> dict[str, Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]]:
        return {"pause": self._pause, "resume": self._resume, "rewind": self._rewind,
                "dump_batch": self._dump_batch, "skip_shard": self._skip_shard}

    # -- the commands --------------------------------------------------------------------

    def _pause(self, args: dict[str, Any], command: dict[str, Any]) -> dict[str, Any]:
        self.paused = True
        return {}

    def _resume(self, args: dict[str, Any], command: dict[str, Any]) -> dict[str, Any]:
        if self.diverged:
            raise CommandFailed(f"the ranks' training states differ: {self.diverged}; rewind again "
                                "(runwatch rewind RUN) until it works on every rank, then resume")
        self.paused = False
        return {}

    def _rewind(self, args: dict[str, Any], command: dict[str, Any]) -> dict[str, Any]:
        w = self.watch
        folder = w.checkpoint_dir
        if folder is None:
            raise CommandFailed("this run has no checkpoint_dir (pass checkpoint_dir= to watch())")
        to = args.get("to", "last_clean")
        before = args.get("before_step")
        refused: list[str] = []
        chosen = None
        if isinstance(to, int):
            exact = [c for c in checkpoints.scan(folder) if c.step == to and c.complete]
            if exact:
                try:
                    checkpoints.verify(exact[-1])
                    chosen = exact[-1]
                except checkpoints.CheckpointError as exc:
                    refused.append(str(exc))
            else:
                refused.append(f"no complete checkpoint at step {to} in {folder}")
            before = to if chosen is None else before
        if chosen is None:
            chosen, skipped = checkpoints.latest_clean(folder, before_step=before)
            refused += [f"{c.path.name}: {why}" for c, why in skipped]
        if chosen is None:
            reason = (f"no clean checkpoint in {folder}"
                      + (f" before step {before}" if before is not None else "")
                      + (f" ({'; '.join(refused)})" if refused else ""))
            # A sharded model loads collectively: the other ranks wait in load() for this one's answer.
            ckpt_io.sharded_load_refused(w.model, reason)
            raise CommandFailed(reason)
        try:
            checkpoints.inside(folder, chosen.path)  # a symlink out of the folder is refused
        except checkpoints.CheckpointError as exc:
            ckpt_io.sharded_load_refused(w.model, str(exc))
            raise
        restored = ckpt_io.load(chosen.path, model=w.model, optimizer=w.optimizer,
                                scheduler=w.scheduler)
        saved_scale = float(restored.extra.get("lr_scale", 1.0)) if restored.extra and "lr_scale" in \
            restored.extra else self.scale_at_save.get(str(chosen.path), 1.0)
        target = self.lr_scale * float(args.get("lr_scale", 1.0))
        scale_learning_rate(w.optimizer, w.scheduler, target / saved_scale)
        self.lr_scale = target
        self.rewinds += 1
        skip = int(args.get("skip_batches", 0))
        if skip and not self.data_consumer:
            # Only watch.data() can drop batches; say so rather than report a skip that never happens.
            refused.append(f"skip_batches={skip} ignored: the loop reads no batches through watch.data()")
            skip = 0
        self.skip_next += skip
        resumed = bool(args.get("resume", True))
        if resumed:
            self.paused = False
        return {"checkpoint": str(chosen.path), "checkpoint_step": chosen.step, "lr_scale": target,
                "skipped_batches": skip, "resumed": resumed, "refused": refused}

    def _dump_batch(self, args: dict[str, Any], command: dict[str, Any]) -> dict[str, Any]:
        w = self.watch
        incident = args.get("incident", command.get("id"))
        folder = w.incident_dir / f"incident-{incident}" / f"rank{w.rank}"
        folder.mkdir(parents=True, exist_ok=True)
        batches = w.recent_batches()
        meta = []
        for i, b in enumerate(batches):
            payload = {"step": b.step, "shard": b.shard, "offset": b.offset,
                       "args": _to_cpu(b.args), "kwargs": _to_cpu(b.kwargs)}
            torch.save(payload, folder / f"batch-{i}-step{b.step}.pt")
            meta.append({"file": f"batch-{i}-step{b.step}.pt", "step": b.step, "shard": b.shard,
                         "offset": b.offset, "tensors": _describe(b.args, b.kwargs)})
        (folder / "batches.json").write_text(json.dumps({"run": w.run, "rank": w.rank, "step": w.step,
                                                         "batches": meta}, indent=2))
        return {"path": str(folder), "batches": len(batches)}

    def _skip_shard(self, args: dict[str, Any], command: dict[str, Any]) -> dict[str, Any]:
        shard = args.get("shard")
        if shard is None:
            raise CommandFailed("skip_shard: no shard named")
        self.skip_shards.add(shard_id(shard))
        return {"shard": shard, "shard_id": shard_id(shard)}

    # -- data ----------------------------------------------------------------------------

    def should_skip(self, batch: Any, shard: Any) -> bool:
        """Whether ``watch.data`` drops this batch; counts what it drops."""
        drop = False
        if self.skip_next > 0:
            self.skip_next -= 1
            drop = True
        elif shard is not None and self.skip_shards and shard_id(shard) in self.skip_shards:
            drop = True
        if drop:
            samples, tokens = _batch_size(batch)
            self.skipped.batches += 1
            self.skipped.samples += samples
            self.skipped.tokens += tokens
        return drop


def launch_id(control: Control) -> str | None:
    """An id every rank of this launch shares and the next launch of the run does not, so the
    daemon tells a relaunch from a reconnect: ``RUNWATCH_LAUNCH`` when set (a launcher's own,
    e.g. ``$SLURM_JOB_ID.$SLURM_RESTART_COUNT``); else under torch.distributed rank 0's random
    id, broadcast once over the control group (at ``watch()``, never in a step); a single process
    draws its own. None when the ranks cannot agree (several processes, no process group)."""
    env = os.environ.get("RUNWATCH_LAUNCH", "").strip()
    if env:
        return env[:128]
    if not control.distributed:
        return uuid.uuid4().hex if control.watch.world_size == 1 else None
    dist = torch.distributed
    box = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    try:
        dist.broadcast_object_list(box, src=0, group=control.group)
    except Exception:  # never crash training over monitoring; the daemon then cannot see relaunches
        log.exception("runwatch: the ranks could not agree on a launch id")
        return None
    return str(box[0]) if box[0] else None


def dump_stacks(watch: Watch, args: dict[str, Any], command: dict[str, Any]) -> dict[str, Any]:
    """Write every thread's Python stack (and the NCCL flight recorder, when it is on) into the
    incident folder; say where the training thread is."""
    incident = args.get("incident", command.get("id"))
    folder = watch.incident_dir / f"incident-{incident}" / f"rank{watch.rank}"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    stacks = folder / f"stacks-{stamp}.txt"
    with stacks.open("w") as f:
        faulthandler.dump_traceback(file=f, all_threads=True)
    files = [stacks.name]
    nccl = _nccl_trace()
    if nccl is not None:
        (folder / f"nccl-trace-{stamp}.pkl").write_bytes(nccl)
        files.append(f"nccl-trace-{stamp}.pkl")
    where, caller = _main_thread_position()
    return {"path": str(folder), "files": files, "main_thread_at": where, "main_thread_in": caller,
            **watch.progress()}


def _main_thread_position() -> tuple[str, str]:
    """The training thread's innermost frame, and the innermost one outside torch and
    runwatch (the line of the training script it is stuck under)."""
    frame = sys._current_frames().get(threading.main_thread().ident or -1)
    if frame is None:
        return "", ""
    stack = traceback.extract_stack(frame)
    library = (str(Path(torch.__file__).parent) + os.sep, str(Path(__file__).parent) + os.sep)

    def show(f: traceback.FrameSummary) -> str:
        return f"{f.filename}:{f.lineno} in {f.name}"

    caller = next((f for f in reversed(stack) if not f.filename.startswith(library)), stack[-1])
    return show(stack[-1]), show(caller)


def _nccl_trace() -> bytes | None:
    """The NCCL flight recorder's buffer (``TORCH_NCCL_TRACE_BUFFER_SIZE`` > 0), or None."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and torch.cuda.is_available()):
        return None
    # Whatever the backend string says ("undefined", "cpu:gloo,cuda:nccl"): the recorder is on
    # when its buffer is, and the call below fails harmlessly where NCCL is not in use.
    if int(os.environ.get("TORCH_NCCL_TRACE_BUFFER_SIZE", "0") or 0) <= 0:
        return None
    try:
        return bytes(torch._C._distributed_c10d._dump_nccl_trace())  # type: ignore[attr-defined]
    except Exception:
        log.exception("runwatch: could not read the NCCL flight recorder")
        return None


def scale_learning_rate(optimizer: torch.optim.Optimizer, scheduler: Any, factor: float) -> None:
    """Multiply every learning rate by ``factor``, in the optimizer and in the scheduler's bases
    (a scheduler recomputes ``lr`` from ``base_lrs`` and would undo a change to ``lr`` alone)."""
    if factor == 1.0:
        return
    for group in optimizer.param_groups:
        for key in ("lr", "initial_lr"):
            value = group.get(key)
            if isinstance(value, torch.Tensor):
                value.mul_(factor)
            elif value is not None:
                group[key] = value * factor
    if scheduler is not None:
        for attr in ("base_lrs", "_last_lr"):
            values = getattr(scheduler, attr, None)
            if isinstance(values, list):
                setattr(scheduler, attr, [v * factor for v in values])


def _key(command: dict[str, Any]) -> tuple[str, int]:
    return str(command.get("origin", "")), int(command.get("id", -1))


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _describe(args: Any, kwargs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(name: str, obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            out[name] = {"shape": list(obj.shape), "dtype": str(obj.dtype)}
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{name}.{k}" if name else str(k), v)
        elif isinstance(obj, list | tuple):
            for i, v in enumerate(obj):
                walk(f"{name}[{i}]", v)

    walk("args", args)
    walk("", kwargs)
    return out


def _batch_size(batch: Any) -> tuple[int, int]:
    """(samples, tokens) of a batch from tensor shapes (no device read): the first integer
    tensor, preferring ``input_ids``."""
    if isinstance(batch, dict):
        ids = batch.get("input_ids")
        candidates = [ids] if isinstance(ids, torch.Tensor) else list(batch.values())
    elif isinstance(batch, list | tuple):
        candidates = list(batch)
    else:
        candidates = [batch]
    for t in candidates:
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            return int(t.shape[0]), int(t.numel()) if not t.is_floating_point() else 0
    return 0, 0


def default_incident_dir(checkpoint_dir: Path | None) -> Path:
    if checkpoint_dir is not None:
        return checkpoint_dir / "runwatch-incidents"
    return Path.home() / ".cache" / "runwatch" / "incidents"
