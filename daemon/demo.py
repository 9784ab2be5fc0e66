"""``runwatch demo``: the quickstart, end to end on this machine, in well under two minutes.

A node daemon starts in the background on a temporary socket and store, with the default rule
pack and a console receiver (a ``log`` receiver whose alerts are echoed here). A tiny GPT
trains on the CPU in this process with the hook attached, a fused AdamW (so the spike guard can
refuse an update without a host sync) and a checkpoint every 25 steps. At step 130 a corrupted
batch (shuffled labels, loss x20) makes the gradient norm spike; what follows is shown as it
happens: the guard refusing the update, the rule firing, the pause, the dumped batch, the
rewind to the last clean checkpoint with the learning rate x0.1, the resumed training, the
incident resolving, the checkpoint tiers retention keeps, and the incident report (HTML with
plots) written from the store after the daemon has stopped.

The training thread prints the signals; a second thread follows the incident's timeline
through the daemon's query API (the same calls ``runwatch incident show`` makes) and a third
echoes the console receiver. They share one lock, so each line is whole; the order of the
stages is causal (the rule cannot fire before the step it judges was sent, and the resumed
steps are printed only after the rewind's row).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import logging
import math
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from runwatch.daemon.client import Client, DaemonUnreachable

RUN = "demo-gpt"
BAD_STEP = 130  # the corrupted batch: after the guard (64 steps) and the rule (32) have warmed up
CKPT_EVERY = 25
STEP_SECONDS = 0.04  # pace the steps so the story can be followed live
VOCAB, CONTEXT, BATCH = 64, 32, 8
SPARK = "▁▂▃▄▅▆▇█"

CONFIG = """\
# The demo daemon's settings (see README "Configuration"): the default rule pack, a console
# receiver, and retention and playbook windows scaled down to a 300-step run.
sample_interval_seconds = 0
retention_quiet_seconds = 0
retention_rescan_seconds = 2
[playbook]
lr_scale = 0.1
watch_steps = 50
[retention]
every_nth = 4
recent_hours = 0
latest_k = 2
confirm_steps = 10
[alerting]
group_wait = "0s"
group_interval = "1s"
[alerting.receivers.console]
type = "log"
"""


def _wait_for_daemon(sock: Path, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with code {proc.returncode}")
        try:
            with Client(sock) as client:
                return client.query("status")
        except DaemonUnreachable:
            time.sleep(0.1)
    raise RuntimeError(f"daemon did not answer on {sock} within {timeout:g}s")


def _query(sock: Path, op: str, **kw: Any) -> dict[str, Any]:
    with Client(sock) as client:
        return client.query(op, **kw)


def _spark(values: list[float]) -> str:
    """A sparkline on a log scale (a 50x spike next to 0.6 still leaves the rest readable)."""
    logs = [math.log10(v) for v in values if v > 0 and math.isfinite(v)]
    if not logs:
        return ""
    lo, hi = min(logs), max(logs)
    span = max(hi - lo, 0.3)
    return "".join(SPARK[min(7, int((math.log10(v) - lo) / span * 7.999))] if v > 0 else " " for v in values)


class Demo:
    def __init__(self, console: Console, steps: int) -> None:
        self.console = console
        self.steps = steps
        self.lock = threading.Lock()
        self.tmp = Path(tempfile.mkdtemp(prefix="runwatch-demo-"))
        self.sock, self.state = self.tmp / "runwatch.sock", self.tmp / "state"
        self.log_path, self.config = self.tmp / "daemon.log", self.tmp / "runwatch.toml"
        self.ckpt_dir = self.tmp / "checkpoints"
        self.stop = threading.Event()
        self.rewound = threading.Event()  # the follower printed the rewind's row
        self.fired = threading.Event()  # ...and the firing's
        self.fired_step: int | None = None
        self.incident: int | None = None
        self.checkpoints: dict[int, str] = {}
        self.losses: dict[int, float] = {}

    def say(self, text: str = "", **kw: Any) -> None:
        with self.lock:
            self.console.print(text, **kw)

    def stage(self, title: str) -> None:
        with self.lock:
            self.console.rule(f"[bold]{title}")

    # -- the daemon -----------------------------------------------------------------------

    def start_daemon(self) -> subprocess.Popen[bytes]:
        self.config.write_text(CONFIG)
        with open(self.log_path, "wb") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "runwatch.daemon", "daemon", "--config", str(self.config),
                 "--socket", str(self.sock), "--state-dir", str(self.state), "--exporter-port", "0"],
                stdout=log_file, stderr=subprocess.STDOUT)
        status = _wait_for_daemon(self.sock, proc)
        rules = status.get("rules") or {}
        self.say(f"daemon pid {proc.pid} on {escape(str(self.sock))}")
        store = self.state / "runwatch.db"
        self.say(f"store {escape(str(store))}, metrics at {status['daemon']['exporter']}")
        self.say(f"{rules.get('loaded', '?')} rules in force (the shipped pack): grad_norm_divergence pauses"
                 " a run whose gradient norm reaches 5x its rolling median and dumps its last batches")
        self.say("playbook: rewind to the newest clean checkpoint with the learning rate x0.1; receiver"
                 " [bold]console[/] (type log) echoes alerts here")
        return proc

    def follow_receiver(self) -> None:
        """Echo what the console receiver (a ``log`` receiver) delivered, from the daemon's log."""
        pos = 0
        while not self.stop.is_set():
            try:
                with open(self.log_path, "rb") as fh:
                    fh.seek(pos)
                    chunk = fh.read()
            except OSError:
                chunk = b""
            end = chunk.rfind(b"\n") + 1
            pos += end
            for line in chunk[:end].decode(errors="replace").splitlines():
                if " runwatch.notify: " in line and ("[FIRING" in line or "[RESOLVED" in line):
                    message = line.split(" runwatch.notify: ", 1)[1]
                    self.fired.wait(timeout=3)  # the timeline's "fired" first: it is the cause
                    self.say(f"[bold magenta]console receiver ▸[/] {escape(message)}")
            self.stop.wait(0.1)

    def follow_incident(self) -> None:
        """Print the run's incident timeline as the daemon writes it."""
        shown = 0
        while not self.stop.is_set():
            try:
                if self.incident is None:
                    found = _query(self.sock, "incidents", run=RUN).get("incidents") or []
                    self.incident = found[-1]["id"] if found else None
                if self.incident is not None:
                    inc = _query(self.sock, "incident", id=self.incident).get("incident") or {}
                    for row in inc.get("timeline", [])[shown:]:
                        self.print_row(row, inc)
                        shown += 1
            except (DaemonUnreachable, OSError, KeyError):
                pass
            self.stop.wait(0.1)

    def print_row(self, row: dict[str, Any], inc: dict[str, Any]) -> None:
        kind, text, detail = row["kind"], row["text"], row.get("detail") or {}
        result = detail.get("result") or {}
        if kind == "alert":
            self.stage("4. the rule fires; the playbook pauses, dumps the batch, rewinds")
            self.say(f"[bold red]fired[/]     {escape(text)}")
            self.fired.set()
        elif kind == "decision":
            self.say(f"[bold]decided[/]   {escape(text)}")
        elif kind == "command":
            self.say(f"[dim]sent      {escape(text)}[/]")
        elif kind == "applied" and text.startswith("paused"):
            self.say(f"[bold yellow]paused[/]    {escape(text)}")
        elif kind == "applied" and text.startswith("dumped"):
            self.say(f"[bold yellow]dumped[/]    {escape(text)}")
            self.show_dump(Path(result.get("path", "")), inc)
        elif kind == "applied" and "checkpoint_step" in result:
            target = result["checkpoint_step"]
            self.say(f"[bold green]rewound[/]   to the checkpoint of step {target}; learning rate now"
                     f" x{result.get('lr_scale')} of the original; resumed before step {detail.get('step')}")
            newer = sorted(s for s in self.checkpoints if target < s <= (self.fired_step or 0))
            if newer:
                self.say(f"          (checkpoint {', '.join(map(str, newer))} came less than confirm_steps"
                         " = 10 steps before the spike: not confirmed clean, so not a rewind target)")
            self.rewound.set()
        elif kind == "resolved":
            self.say(f"[bold green]resolved[/]  incident {inc.get('id')}: {escape(text)}")
        else:
            self.say(f"{kind:9} {escape(text)}")

    def show_dump(self, folder: Path, inc: dict[str, Any]) -> None:
        try:
            meta = json.loads((folder / "batches.json").read_text())
        except (OSError, ValueError) as exc:
            self.say(f"          (cannot read the dump: {escape(str(exc))})")
            return
        for b in meta.get("batches", []):
            tensors = ", ".join(f"{k} {v['dtype'].removeprefix('torch.')} {v['shape']}"
                                for k, v in b.get("tensors", {}).items())
            culprit = b.get("step") == inc.get("first_step")
            bad = "  [bold red]← the step the rule fired on[/]" if culprit else ""
            loss = self.losses.get(b.get("step"))
            shown = f", loss {loss:.3g}" if loss is not None else ""
            self.say(f"          {escape(b['file'])}: step {b['step']}, {escape(tensors)}{shown}{bad}")

    # -- training -------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        # The hook logs each command it applies (the timeline shows those) and any it could not
        # apply: the failures are shown, the rest kept off the terminal.
        hook_log = logging.getLogger("runwatch.hooks")
        handler = _Echo(self)
        hook_log.addHandler(handler)
        hook_log.propagate = False
        try:
            return self._train()
        finally:
            hook_log.removeHandler(handler)
            hook_log.propagate = True

    def _train(self) -> dict[str, Any]:
        import torch

        import runwatch.hooks
        from runwatch.hooks.tinygpt import TinyGPT

        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = TinyGPT(vocab=VOCAB, context=CONTEXT)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
        steps = self.steps
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / 50) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps))))
        watch = runwatch.hooks.watch(model, optimizer, run=RUN, socket=self.sock, flush_every=1,
                                     checkpoint_dir=self.ckpt_dir, scheduler=schedule, control_every=1,
                                     keep_batches=4)  # a pause dumps the last 4: the spike's among them
        params = sum(p.numel() for p in model.parameters())
        self.say(f"TinyGPT ({params / 1e3:.0f}k parameters), fused AdamW: guard mode"
                 f" [bold]{watch.guard_mode}[/] (refuses a spike's update on the device, no host sync);"
                 f" a checkpoint every {CKPT_EVERY} steps; the batch of step {BAD_STEP} is corrupted")
        self.say("[dim] step    loss  grad norm  x median  learning rate  grad norm, last 40 steps[/]")
        first_param = next(iter(model.parameters()))
        norms: deque[float] = deque(maxlen=128)
        spark: deque[float] = deque(maxlen=40)
        rewinds_seen = 0
        resumed_lines = 0
        started = time.monotonic()
        for step, index in zip(range(steps), watch.data(itertools.count()), strict=False):
            t0 = time.perf_counter()
            x, y = _batch(index)
            bad = index == BAD_STEP
            if bad:
                y = _corrupt(y, index)
            out = model(x, labels=y)  # a pause holds the run here, before the forward
            rewound = watch.control.rewinds != rewinds_seen
            if rewound:
                rewinds_seen = watch.control.rewinds
                self.rewound.wait(timeout=10)  # the follower prints the rewind's row first
                self.stage("5. training resumes from the clean checkpoint, learning rate"
                           f" x{watch.lr_scale:g}")
                resumed_lines = 4
            loss = out.loss * (20.0 if bad else 1.0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")))
            before = _opt_step(optimizer, first_param)
            with self.lock:  # the daemon learns of this step inside optimizer.step(): print it first
                optimizer.step()
                schedule.step()
                skipped = _opt_step(optimizer, first_param) == before
                median = sorted(norms)[len(norms) // 2] if norms else float("nan")
                spark.append(norm)
                lr = optimizer.param_groups[0]["lr"]
                ratio = norm / median if median == median else float("nan")
                self.losses[step] = out.loss.item()
                shown = f"{ratio:8.1f}" if ratio == ratio else f"{'-':>8}"
                line = (f"{step:5d}  {self.losses[step]:6.3f}  {norm:9.3f}  {shown}  {lr:13.2e}  "
                        f"{_spark(list(spark))}")
                if bad:
                    self.console.rule(f"[bold]3. a bad batch at step {step}")
                    self.console.print(f"[bold red]{line}[/]")
                    self.console.print(f"[bold red]spike[/]     step {step}: shuffled labels and loss x20"
                                       f" give a gradient norm of {norm:.3g}, {ratio:.0f}x the median")
                    self.fired_step = step
                    if skipped:
                        self.console.print(f"[bold red]guard[/]     the spike guard refused step {step}'s"
                                           " update on the device (fused AdamW's step counter did not move)")
                elif step % 10 == 0 or resumed_lines > 0 or step == steps - 1 or (
                        self.fired_step is not None and step <= self.fired_step + 2 and not rewinds_seen):
                    self.console.print(line, highlight=False)
                    resumed_lines -= 1
                if not bad:
                    norms.append(norm)
            if watch.step % CKPT_EVERY == 0:
                saved = watch.checkpoint()
                if saved is not None:
                    self.checkpoints[saved.step] = str(saved.path)
                    self.say(f"[dim]checkpoint of step {saved.step} saved: {escape(saved.path.name)}"
                             f" ({saved.size_bytes / 1e6:.1f} MB), registered with the daemon[/]")
            time.sleep(max(0.0, STEP_SECONDS - (time.perf_counter() - t0)))
        watch.close()
        return {"seconds": time.monotonic() - started, "lr_scale": watch.lr_scale,
                "rewinds": watch.control.rewinds, "final_step": watch.step,
                "skipped": vars(watch.control.skipped)}

    # -- after training --------------------------------------------------------------------

    def show_tiers(self) -> None:
        plan = _query(self.sock, "retention_plan", run=RUN)
        if "error" in plan:
            self.say(f"retention plan: {escape(plan['error'])}")
            return
        table = Table(title=f"runwatch retention plan {RUN}", title_justify="left")
        for col in ("step", "size", "", "why"):
            table.add_column(col)
        present = set()
        for d in plan["decisions"]:
            present.add(d["step"])
            verdict = "keep" if d["keep"] else "[red]delete[/red]"
            table.add_row(str(d["step"]), f"{d['size_bytes'] / 1e6:.1f} MB", verdict, escape(d["reason"]))
        abandoned = sorted(self.ckpt_dir.glob("abandoned/incident-*/*"))
        for path in abandoned:
            table.add_row(path.name.removeprefix("step-").lstrip("0") or "0", "", "moved",
                          f"quarantined in abandoned/{path.parent.name}/: saved after the rewind target")
        for step in sorted(set(self.checkpoints) - present - {int(p.name[5:]) for p in abandoned
                                                               if p.name.startswith("step-")}):
            table.add_row(str(step), "", "[dim]deleted[/]",
                          "[dim]no policy kept it (deleted during the run)[/]")
        with self.lock:
            self.console.print(table)
            self.console.print("policy: every_nth = 4 (kept for good), latest_k = 2, protections first"
                               " (newest complete, each open incident's clean rollback target, pins)")


class _Echo(logging.Handler):
    def __init__(self, demo: Demo) -> None:
        super().__init__(logging.ERROR)
        self.demo = demo

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage().removeprefix("runwatch: ")
        self.demo.say(f"[bold cyan]hook ▸[/] {escape(message)}")


def _batch(index: int) -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(index)
    start = torch.randint(0, VOCAB, (BATCH, 1), generator=g)
    stride = torch.randint(1, 4, (BATCH, 1), generator=g)
    seq = (start + stride * torch.arange(CONTEXT + 1)) % VOCAB
    return seq[:, :-1].clone(), seq[:, 1:].clone()


def _corrupt(labels: Any, index: int) -> Any:
    import torch

    g = torch.Generator().manual_seed(7 + index)
    return torch.randint(0, VOCAB, labels.shape, generator=g)


def _opt_step(optimizer: Any, param: Any) -> float:
    state = optimizer.state.get(param, {})
    step = state.get("step")
    return float(step) if step is not None else 0.0


def run_demo(steps: int = 300) -> int:
    from runwatch.daemon import report
    from runwatch.daemon.paths import default_rules_dir

    wall = time.monotonic()
    console = Console(soft_wrap=True)
    if importlib.util.find_spec("torch") is None:
        console.print("[red]the demo trains a model and needs torch:[/red] pip install torch")
        return 2
    if steps < BAD_STEP + 70:
        console.print(f"[red]--steps: at least {BAD_STEP + 70}[/] (the bad batch comes at step {BAD_STEP})")
        return 2
    demo = Demo(console, steps)
    console.print("[bold]runwatch demo[/]: a tiny GPT meets a bad batch; the node daemon catches the spike,"
                  " pauses the run, dumps the batch, rewinds it and writes the incident report")
    demo.stage("1. start the node daemon (temporary socket and store, console receiver)")
    daemon = demo.start_daemon()
    followers = [threading.Thread(target=demo.follow_incident, daemon=True),
                 threading.Thread(target=demo.follow_receiver, daemon=True)]
    for t in followers:
        t.start()
    code = None
    try:
        demo.stage(f"2. train a tiny GPT on the CPU for {steps} steps, hook attached")
        trained = demo.train()
        time.sleep(1.5)  # let the incident resolve and the receiver's last message arrive
        demo.say(f"trained {trained['final_step']} steps in {trained['seconds']:.1f}s; learning rate x"
                 f"{trained['lr_scale']:g} after {trained['rewinds']} rewind")
        demo.stage("6. checkpoint tiers (runwatch retention plan)")
        demo.show_tiers()
    finally:
        demo.stop.set()
        for t in followers:
            t.join(timeout=5)
        demo.stage("7. stop the daemon (SIGTERM)")
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(timeout=30)
        console.print(f"daemon exited with code {code}")
    demo.stage("8. the incident report (read from the store; no daemon needed)")
    out = demo.tmp / "report"
    summary = report.build(demo.state / "runwatch.db", RUN, None, out, [default_rules_dir()])
    inc = summary["incident"] or {}
    rewinds = summary["rewinds"]
    console.print(f"incident {inc.get('id')} ({inc.get('state')}): {escape(inc.get('summary', ''))}")
    if rewinds:
        console.print(f"rewind target: the checkpoint of step {rewinds[0]['target_step']}, applied before"
                      f" step {rewinds[0]['at_step']}; {len(summary['timeline'])} timeline rows")
    for p in summary["plots"]:
        console.print(f"plot: {escape(p)}")
    console.print(f"[bold]report: {escape(summary['html'])}[/] (open it in a browser)")
    console.print(f"everything the demo wrote is in {escape(str(demo.tmp))} (daemon log, store, checkpoints)")
    console.print(f"[bold]demo finished in {time.monotonic() - wall:.1f}s (wall time)[/]")
    return 0 if code == 0 else 1

