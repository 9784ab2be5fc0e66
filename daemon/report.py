"""``runwatch report RUN [--incident ID]``: an incident (or run) report, HTML with PNG plots.

What a person reads after the playbook has acted on a run: the signals around the incident
with the firing rule's baseline band, the step the rule fired, the pause, the rewind target
and the resumed curve; the timeline; the dumped batches; what was skipped. Without
``--incident`` it reports the run's newest incident, or the run as a whole when it has none.

The report reads the daemon's SQLite store directly and read-only (``Store.reader``), so it
works with no daemon running (after a crash, on a copy of the state folder). The store is found
the way the daemon finds it: ``--store FILE``, else ``<state_dir>/runwatch.db`` with the state
folder from ``--state-dir``, ``$RUNWATCH_STATE_DIR``, the config file or the default. The band
is recomputed from the stored series with the rule's own baseline code
(:class:`runwatch.daemon.rules.baseline.Window`) and the rule as it is defined in the rule
files the daemon loads (``rules`` in the settings), so it is the baseline the rule judged with.

Plots are drawn with matplotlib's Agg canvas (no display, no pyplot state). The dumped batches
are read without torch (the daemon's node may not have it), through an unpickler that accepts
tensors and nothing else.
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import html
import io
import json
import math
import pickle
import sqlite3
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from runwatch.daemon.rules.spec import Leaf, LoadedRule

#: Steps shown before the first and after the last marker of an incident.
BEFORE, AFTER = 40, 100
SIGNALS = ("grad_norm", "loss")
COLORS = {"before": "tab:blue", "undone": "0.55", "after": "tab:green", "fired": "tab:red",
          "paused": "tab:orange", "rewound": "tab:purple", "target": "darkgreen", "band": "#9ecae1",
          "resolved": "0.3", "escalated": "darkred", "resumed": "tab:purple"}
#: Timeline kinds as a person reads them; ``applied`` is named by its command's action.
EVENT_NAMES = {"alert": "fired", "decision": "decided", "command": "sent", "failed": "failed",
               "resolved": "resolved", "escalated": "escalated", "verify": "verified shard",
               "dump": "stacks dumped"}
APPLIED_NAMES = {"pause": "paused", "resume": "resumed", "rewind": "rewound", "dump_batch": "dumped",
                 "skip_shard": "skipping shard"}


#: Why a report could not be written, as the CLI's exit statuses name them (see ``cmd_report``).
EXIT_CONFIG, EXIT_USAGE = "config", "usage"


class ReportError(Exception):
    """The report cannot be written; the message says why. ``code`` says whose fault it is:
    ``config`` (no store where the settings say) or ``usage`` (no such run or incident)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


# -- what happened -------------------------------------------------------------------------------


@dataclass
class Rewind:
    at_step: int  # the step before which it was applied; training went on from here
    target_step: int  # the checkpoint's step
    checkpoint: str
    lr_scale: float
    skipped_batches: int
    resumed: bool
    time: float
    refused: list[str] = field(default_factory=list)


@dataclass
class Marker:
    step: int
    kind: str  # fired | paused | rewound | resumed | resolved | escalated
    label: str


@dataclass
class Band:
    """The firing rule's baseline over the shown steps, and where it would fire."""

    rule: str
    metric: str
    rank: int
    describe: str  # "5x the median of the last 128 steps"
    steps: np.ndarray
    center: np.ndarray
    low: np.ndarray | None
    high: np.ndarray | None
    threshold: np.ndarray | None  # the line the rule fires at (ratio/zscore bound)
    note: str = ""


def _timeline(inc: dict[str, Any]) -> list[dict[str, Any]]:
    """The incident's timeline with each row named (fired, paused, rewound, resumed, ...) and
    its step; a rewind that resumed the run adds a ``resumed`` row after it."""
    commands = {c["id"]: c for c in inc["commands"]}
    rows: list[dict[str, Any]] = []
    for t in inc["timeline"]:
        detail = t["detail"] or {}
        kind = t["kind"]
        event = EVENT_NAMES.get(kind, kind)
        step = detail.get("step")
        if kind == "applied":
            action = commands.get(detail.get("command"), {}).get("action", "")
            event = APPLIED_NAMES.get(action, f"{action} applied")
        if kind == "escalated" and step is None:  # it escalates the firing just before it
            step = next((r["step"] for r in reversed(rows) if r["event"] == "fired"), None)
        rows.append({"time": t["time"], "step": step, "event": event, "text": t["text"]})
        if kind == "applied" and event == "rewound" and (detail.get("result") or {}).get("resumed"):
            result = detail["result"]
            rows.append({"time": t["time"], "step": step, "event": "resumed",
                         "text": f"training resumed at step {step} from the checkpoint of step"
                                 f" {result.get('checkpoint_step')} with the learning rate"
                                 f" x{float(result.get('lr_scale', 1.0)):g} of the original"})
    return rows


def _rewinds(inc: dict[str, Any]) -> list[Rewind]:
    out = []
    for t in inc["timeline"]:
        detail = t["detail"] or {}
        result = detail.get("result") or {}
        if t["kind"] == "applied" and "checkpoint_step" in result and detail.get("step") is not None:
            out.append(Rewind(int(detail["step"]), int(result["checkpoint_step"]),
                              str(result.get("checkpoint")), float(result.get("lr_scale", 1.0)),
                              int(result.get("skipped_batches") or 0), bool(result.get("resumed")),
                              float(t["time"]), list(result.get("refused") or [])))
    return out


def _markers(rows: list[dict[str, Any]]) -> list[Marker]:
    out = []
    for r in rows:
        if r["event"] in ("fired", "paused", "rewound", "resumed", "resolved", "escalated") and \
                isinstance(r["step"], int):
            out.append(Marker(r["step"], r["event"], r["text"]))
    return out


# -- the store -------------------------------------------------------------------------------------


def series(conn: sqlite3.Connection, run: str, rank: int, metric: str
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, times, values) of one metric of one rank, in step order (``store.series`` plus
    the sample times a time-window baseline needs)."""
    from runwatch.daemon.store import metric_sets

    sets = {i: names.index(metric) for i, names in metric_sets(conn).items() if metric in names}
    if not sets:
        return np.empty(0, dtype=np.int64), np.empty(0), np.empty(0)
    rows = conn.execute(
        "SELECT step, time, metric_set_id, data FROM samples WHERE stream_id = ("
        " SELECT s.id FROM streams s JOIN runs r ON r.id = s.run_id WHERE r.name = ? AND s.rank = ?)"
        " ORDER BY step", (run, rank)).fetchall()
    steps, times, values = [], [], []
    for step, t, set_id, data in rows:
        col = sets.get(set_id)
        if col is not None:
            steps.append(step)
            times.append(t)
            values.append(np.frombuffer(data, dtype="<f8")[col])
    return np.asarray(steps, dtype=np.int64), np.asarray(times, dtype=np.float64), np.asarray(values)


def _open_store(path: Path) -> sqlite3.Connection:
    from runwatch.daemon.store import Store

    if not path.is_file():
        raise ReportError(f"no runwatch store at {path} (give --state-dir or --store; a daemon "
                          "started with --state-dir DIR keeps it in DIR/runwatch.db)", EXIT_CONFIG)
    try:
        conn = Store.reader(path)
        conn.execute("SELECT 1 FROM runs LIMIT 1").fetchall()
    except sqlite3.Error as exc:
        raise ReportError(f"store {path} cannot be read: {exc}", EXIT_CONFIG) from None
    return conn


# -- the baseline band --------------------------------------------------------------------------------


def find_rule(rules: list[LoadedRule], name: str | None, metric: str) -> tuple[LoadedRule, int] | None:
    """The rule (and which of its conditions) whose baseline to draw for ``metric``: the named
    rule when it judges ``metric`` with a baseline, else the most severe rule that does."""
    from runwatch.daemon.rules.spec import SEVERITY_ORDER

    def leaf_of(lr: LoadedRule) -> int | None:
        for i, leaf in enumerate(lr.rule.leaves):
            if leaf.baseline is not None and fnmatch.fnmatchcase(metric, leaf.metric):
                return i
        return None

    for lr in rules:
        if lr.rule.name == name and (i := leaf_of(lr)) is not None:
            return lr, i
    found = [(lr, i) for lr in rules if (i := leaf_of(lr)) is not None]
    found.sort(key=lambda x: -SEVERITY_ORDER[x[0].rule.severity])
    return found[0] if found else None


def compute_band(steps: np.ndarray, times: np.ndarray, values: np.ndarray, loaded: LoadedRule,
                 leaf_index: int, rank: int, metric: str) -> Band:
    """Replay the stored series through the rule's own baseline window, as the engine judged it
    step by step, and turn the condition into a band: ``ratio >= k`` shades from the baseline up
    to k x the baseline, ``zscore`` the baseline +- k spreads, ``between``/``outside`` their bounds."""
    from runwatch.daemon.rules.baseline import Window, describe
    from runwatch.daemon.rules.engine import ZSCORE_FLOOR

    leaf: Leaf = loaded.rule.leaves[leaf_index]
    assert leaf.baseline is not None
    cond = leaf.when
    frozen = loaded.frozen[leaf_index]
    window = Window(leaf.baseline, frozen, need_scale=cond.measure == "zscore")
    window.widen(1)
    x = np.where(np.isfinite(values), values, np.nan)[:, None]
    with np.errstate(all="ignore"):
        center, scale, ready = window.judge(steps, times, x)
        center = np.where(np.broadcast_to(ready, center.shape), center, np.nan)[:, 0]
        scale = scale[:, 0]
        low = high = threshold = None
        what = describe(leaf.baseline, frozen)
        if cond.measure == "ratio":
            if cond.kind == "compare":
                threshold = cond.low * center
                low, high = (center, threshold) if cond.op in (">", ">=") else (threshold, center)
                text = f"fires at {cond.low:g}x the {what}"
            else:
                low, high = cond.low * center, cond.high * center
                text = f"{cond.kind} {cond.low:g}x and {cond.high:g}x the {what}"
        elif cond.measure == "zscore":
            spread = np.maximum(scale, np.maximum(ZSCORE_FLOOR * np.abs(center), 1e-12))
            if cond.kind == "compare":
                k = abs(cond.low)
                low, high = center - k * spread, center + k * spread
                threshold = center + cond.low * spread
                text = f"fires at {cond.low:g} spreads from the {what}"
            else:
                low, high = center + cond.low * spread, center + cond.high * spread
                text = f"{cond.kind} {cond.low:g} and {cond.high:g} spreads from the {what}"
        else:
            text = f"{cond.text} (the {what} drawn for reference)"
    return Band(loaded.rule.name, metric, rank, f"{loaded.rule.name}: {text}", steps, center,
                low, high, threshold)


def _load_rules(rule_paths: list[Path]) -> tuple[list[LoadedRule], list[str]]:
    from runwatch.daemon.rules.spec import load_rules

    rules, errors = load_rules(rule_paths)
    return rules, [str(e) for e in errors]


# -- dumped batches ------------------------------------------------------------------------------


def dumped_batches(inc: dict[str, Any], conn: sqlite3.Connection, run: str) -> list[dict[str, Any]]:
    """What ``dump_batch`` wrote (``incident-N/rank<R>/batches.json`` and a ``.pt`` per batch),
    one row per batch and rank, with the loss and gradient norm stored for its step and a
    summary of each tensor's values (read without torch: see :class:`_TensorUnpickler`)."""
    out: list[dict[str, Any]] = []
    seen: set[Path] = set()
    for c in inc["commands"]:
        if c["action"] != "dump_batch" or c["state"] != "applied" or not (c.get("result") or {}).get("path"):
            continue
        answered = Path(c["result"]["path"])
        if answered.parent in seen:  # a later dump of the same incident wrote into the same folder
            continue
        seen.add(answered.parent)
        folders = sorted(answered.parent.glob("rank*")) if answered.parent.is_dir() else []
        if not folders:
            out.append({"command": c["id"], "folder": str(answered), "missing": True})
            continue
        for folder in folders:
            try:
                meta = json.loads((folder / "batches.json").read_text())
            except (OSError, ValueError) as exc:
                out.append({"command": c["id"], "folder": str(folder), "missing": True, "error": str(exc)})
                continue
            rank = int(meta.get("rank", 0))
            stored = {m: dict(zip(*series(conn, run, rank, m)[::2], strict=True)) for m in SIGNALS}
            for b in meta.get("batches", []):
                path = folder / b["file"]
                row = {"command": c["id"], "folder": str(folder), "file": b["file"], "rank": rank,
                       "step": b.get("step"), "shard": b.get("shard"), "offset": b.get("offset"),
                       "size_bytes": path.stat().st_size if path.exists() else None,
                       "tensors": {k: {**v, "values": ""} for k, v in (b.get("tensors") or {}).items()},
                       **{m: stored[m].get(b.get("step")) for m in SIGNALS}}
                if path.exists():
                    _describe_values(path, row["tensors"])
                out.append(row)
    return out


#: Storage classes a ``torch.save`` file names, as numpy dtypes (bfloat16 is widened by hand).
_STORAGES = {"DoubleStorage": "<f8", "FloatStorage": "<f4", "HalfStorage": "<f2", "BFloat16Storage": "<u2",
             "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
             "ByteStorage": "u1", "BoolStorage": "?"}


class _Storage:
    def __init__(self, name: str) -> None:
        self.name, self.dtype = name, np.dtype(_STORAGES[name])


class _TensorUnpickler(pickle.Unpickler):
    """Reads a ``torch.save`` zip as numpy arrays, without torch and without running arbitrary
    code: only tensors, storages and OrderedDict may be named (anything else is refused, as
    ``weights_only=True`` refuses it)."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(archive.read(f"{prefix}data.pkl")))
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGES:
            return _Storage(name)
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"{module}.{name} is not a tensor")

    def persistent_load(self, pid: Any) -> Any:
        _, storage, key, _location, numel = pid
        raw = np.frombuffer(self.archive.read(f"{self.prefix}data/{key}"), dtype=storage.dtype)[:numel]
        if storage.name == "BFloat16Storage":
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                    *_: Any) -> np.ndarray:
    item = storage.itemsize
    return np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * item for s in stride)).copy()


def load_dumped(path: Path) -> dict[str, Any]:
    """One dumped batch (``torch.save`` of step, shard, offset, args, kwargs) with numpy arrays
    for its tensors."""
    with zipfile.ZipFile(path) as archive:
        pkl = next(n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
        return _TensorUnpickler(archive, pkl[: -len("data.pkl")]).load()


def _describe_values(path: Path, tensors: dict[str, dict[str, Any]]) -> None:
    try:
        payload = load_dumped(path)
    except Exception as exc:  # a damaged or unfamiliar dump is reported, not raised
        for v in tensors.values():
            v["values"] = f"not read ({exc})"
        return
    found: dict[str, np.ndarray] = {}

    def walk(name: str, obj: Any) -> None:
        if isinstance(obj, np.ndarray):
            found[name] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{name}.{k}" if name else str(k), v)
        elif isinstance(obj, list | tuple):
            for i, v in enumerate(obj):
                walk(f"{name}[{i}]", v)

    walk("args", payload.get("args"))
    walk("", payload.get("kwargs"))
    for name, t in found.items():
        entry = tensors.setdefault(name, {"shape": list(t.shape), "dtype": str(t.dtype)})
        if t.size == 0:
            entry["values"] = "empty"
        elif t.dtype.kind == "f":
            f = t.astype(np.float64)
            ok = f[np.isfinite(f)]
            bad = f.size - ok.size
            stats = (f"mean {ok.mean():.4g}, std {ok.std():.4g}, min {ok.min():.4g}, max {ok.max():.4g}"
                     if ok.size else "")
            entry["values"] = stats + (f"; {bad} non-finite" if bad else "")
        else:
            first = t.reshape(-1)[: min(16, t.shape[-1] if t.ndim else 1)].tolist()
            entry["values"] = (f"min {t.min()}, max {t.max()}, {len(np.unique(t))} distinct;"
                               f" first row: {' '.join(map(str, first))}")


# -- what was skipped -------------------------------------------------------------------------------


def skipped(conn: sqlite3.Connection, run: str, rank: int, rewinds: list[Rewind],
            inc: dict[str, Any] | None) -> dict[str, Any]:
    """Every way the run did not train on something: updates the guard refused, optimizer steps
    a rewind undid (whose batches were not trained again: the data goes on forward), batches and
    shards a command said to skip (the hook's counters)."""
    s, _, v = series(conn, run, rank, "guard_skipped")
    guard = [int(x) for x in s[v > 0.5]]
    counters = {}
    for name in ("skipped_batches", "skipped_samples", "skipped_tokens"):
        _, _, vals = series(conn, run, rank, name)
        counters[name] = int(vals[-1]) if len(vals) and math.isfinite(vals[-1]) else 0
    undone = [{"from_step": r.target_step, "to_step": r.at_step - 1,
               "steps": max(0, r.at_step - r.target_step), "extra_batches_skipped": r.skipped_batches}
              for r in rewinds]
    shards = [c["result"].get("shard") for c in (inc or {}).get("commands", [])
              if c["action"] == "skip_shard" and c["state"] == "applied" and c.get("result")]
    return {"guard_skipped_steps": guard, "rewound_steps": undone, "counters": counters, "shards": shards}


# -- plots ---------------------------------------------------------------------------------------------


def _figure(ratios: list[float]) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11.5, 1.0 + 1.15 * sum(ratios)), dpi=110, layout="constrained")
    axes = fig.subplots(len(ratios), 1, sharex=True, height_ratios=ratios, squeeze=False)[:, 0]
    return fig, list(axes)


def _segments(steps: np.ndarray, rewinds: list[Rewind]) -> list[tuple[np.ndarray, str, str]]:
    """Masks of the series: trained before the first rewind's undone steps, undone by a rewind,
    and trained after each rewind (with the learning-rate factor then in force)."""
    undone = np.zeros(len(steps), dtype=bool)
    for r in rewinds:
        undone |= (steps >= r.target_step) & (steps < r.at_step)
    first = rewinds[0].at_step if rewinds else None
    out = []
    before = ~undone & (steps < first if first is not None else np.ones(len(steps), dtype=bool))
    out.append((before, COLORS["before"], "trained" if not rewinds else "before the incident"))
    if undone.any():
        out.append((undone, COLORS["undone"], "updates undone by the rewind"))
    for i, r in enumerate(rewinds):
        nxt = rewinds[i + 1].at_step if i + 1 < len(rewinds) else None
        mask = ~undone & (steps >= r.at_step) & ((steps < nxt) if nxt is not None else True)
        out.append((mask, COLORS["after"] if i == 0 else "tab:cyan",
                    f"resumed from step {r.target_step}'s checkpoint, LR x{r.lr_scale:g}"))
    return out


def _plot_series(ax: Axes, steps: np.ndarray, values: np.ndarray, rewinds: list[Rewind],
                 label_segments: bool) -> None:
    finite = np.isfinite(values)
    for mask, color, label in _segments(steps, rewinds):
        if not mask.any():
            continue
        # NaN between separated parts keeps one segment from joining the next across a gap; the
        # undone steps join the curve before them (one training), the resumed ones start afresh.
        idx = np.flatnonzero(mask)
        if color == COLORS["undone"] and idx[0] > 0 and not mask[idx[0] - 1]:
            idx = np.insert(idx, 0, idx[0] - 1)
        xs, ys = steps[idx].astype(float), np.where(finite[idx], values[idx], np.nan)
        breaks = np.flatnonzero(np.diff(idx) > 1) + 1
        xs, ys = np.insert(xs, breaks, np.nan), np.insert(ys, breaks, np.nan)
        ax.plot(xs, ys, color=color, lw=1.4, label=label if label_segments else None, zorder=4)
    bad = ~finite
    if bad.any():
        top = np.nanmax(values[finite]) if finite.any() else 1.0
        ax.scatter(steps[bad], np.full(bad.sum(), top), marker="^", color=COLORS["fired"], zorder=5,
                   label="non-finite value (NaN/Inf)")


def _draw_band(ax: Axes, band: Band, lo: int, hi: int) -> None:
    sel = (band.steps >= lo) & (band.steps <= hi)
    s = band.steps[sel]
    ax.plot(s, band.center[sel], color="black", lw=1.0, ls="--", label=f"rolling baseline ({band.rule})")
    if band.low is not None and band.high is not None:
        ax.fill_between(s, band.low[sel], band.high[sel], color=COLORS["band"], alpha=0.45, lw=0,
                        label="baseline band: " + band.describe.split(": ", 1)[1])
    if band.threshold is not None:
        ax.plot(s, band.threshold[sel], color=COLORS["fired"], lw=0.9, ls=":", label="firing threshold")


def _draw_markers(ax: Axes, markers: list[Marker], rewinds: list[Rewind], lo: int, hi: int,
                  label: bool) -> None:
    seen: set[str] = set()
    for r in rewinds:
        if lo <= r.target_step <= hi:
            ax.axvline(r.target_step, color=COLORS["target"], ls="--", lw=1.6,
                       label=None if not label or "target" in seen else "rewind target: checkpoint step")
            seen.add("target")
        ax.axvspan(r.target_step, r.at_step, color=COLORS["undone"], alpha=0.12, lw=0)
    styles = {"fired": ("-", 1.6), "paused": ("-.", 1.6), "rewound": (":", 2.2), "resolved": ("--", 1.0),
              "escalated": ("-", 2.0), "resumed": ("--", 1.6)}
    rewound_at = {r.at_step for r in rewinds}
    for m in markers:
        if m.kind not in styles or not lo <= m.step <= hi or (m.kind == "resumed" and m.step in rewound_at):
            continue
        ls, lw = styles[m.kind]
        name = {"fired": "rule fired", "paused": "paused", "rewound": "rewound and resumed",
                "resolved": "incident resolved", "escalated": "escalated: waits for a person",
                "resumed": "resumed by a person"}[m.kind]
        ax.axvline(m.step, color=COLORS[m.kind], ls=ls, lw=lw, alpha=0.8, zorder=2,
                   label=None if not label or m.kind in seen else name)
        seen.add(m.kind)


def _annotate(ax: Axes, markers: list[Marker], rewinds: list[Rewind], lo: int, hi: int) -> None:
    """Step labels along the top of the first panel, staggered so near ones do not overlap."""
    items: list[tuple[int, str, str]] = [(r.target_step, f"checkpoint {r.target_step}\n(rewind target)",
                                          COLORS["target"]) for r in rewinds]
    merged: dict[int, list[str]] = {}
    colors: dict[int, str] = {}
    rewound_at = {r.at_step for r in rewinds}
    for m in markers:
        if m.kind in ("fired", "paused", "rewound", "escalated") or (m.kind == "resumed"
                                                                     and m.step not in rewound_at):
            if m.kind not in merged.setdefault(m.step, []):
                merged[m.step].append(m.kind)
            colors.setdefault(m.step, COLORS[m.kind])
    items += [(step, " + ".join(words) + f"\nstep {step}", colors[step]) for step, words in merged.items()]
    items = sorted(i for i in items if lo <= i[0] <= hi)
    span = max(hi - lo, 1)
    level, last = 0, -math.inf
    for step, text, color in items:
        level = level + 1 if (step - last) / span < 0.12 else 0
        last = step
        right = (step - lo) / span > 0.8  # near the right edge: the label goes left of its line
        ax.annotate(text, xy=(step, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(-4 if right else 4, -4 - 26 * level), textcoords="offset points", va="top",
                    ha="right" if right else "left", fontsize=8, color=color,
                    bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": color, "alpha": 0.85})


def _headroom(ax: Axes) -> None:
    """Room above the data for the step labels, so they never sit on the curve."""
    bottom, top = ax.get_ylim()
    if ax.get_yscale() == "log":
        ax.set_ylim(bottom, top * (top / bottom) ** 0.45)
    else:
        ax.set_ylim(bottom, top + 0.45 * (top - bottom))


def _log_scale(ax: Axes, values: np.ndarray) -> None:
    v = values[np.isfinite(values) & (values > 0)]
    if len(v) and v.max() / max(np.percentile(v, 5), 1e-300) > 30:
        ax.set_yscale("log")


def plot_signals(conn: sqlite3.Connection, run: str, rank: int, lo: int, hi: int, band: Band | None,
                 markers: list[Marker], rewinds: list[Rewind], checkpoints: list[int], title: str,
                 path: Path, focus: str | None = None) -> Path:
    """Over steps ``lo``-``hi``: the incident's own metric when it is neither (``focus``), the
    gradient norm and the loss, the band on whichever the rule judges, and the learning rate."""
    metrics = [*([focus] if focus else []), *SIGNALS]
    lr_name = next((n for (n,) in conn.execute("SELECT names FROM metric_sets")
                    for n in n.split("\n") if n.startswith("learning_rate/")), None)
    fig, axes = _figure([3.0] * (len(metrics) - 1) + [2.0] + ([1.3] if lr_name else []))
    ax_first, ax_g = axes[0], axes[len(metrics) - 2]
    data = {m: series(conn, run, rank, m) for m in (*metrics, "guard_skipped", "guard_threshold")}
    for ax, metric in zip(axes, metrics, strict=False):
        steps, _, values = data[metric]
        sel = (steps >= lo) & (steps <= hi)
        if band is not None and band.metric == metric:
            _draw_band(ax, band, lo, hi)
        _plot_series(ax, steps[sel], values[sel], rewinds, label_segments=ax is ax_first)
        _log_scale(ax, values[sel])
        _draw_markers(ax, markers, rewinds, lo, hi, label=ax is ax_first)
        ax.set_ylabel({"grad_norm": "gradient norm", "loss": "loss"}.get(metric, metric.replace("/", "/\n")))
        ax.grid(True, alpha=0.3, which="both")
    # The hook's spike guard: its threshold, and the steps whose update it refused.
    gs, _, gv = data["guard_threshold"]
    sel = (gs >= lo) & (gs <= hi) & np.isfinite(gv)
    if sel.any():
        ax_g.plot(gs[sel], gv[sel], color="tab:brown", lw=0.9, ls=(0, (1, 2)),
                  label="spike guard threshold (hook)" if ax_g is ax_first else None)
    ks, _, kv = data["guard_skipped"]
    flagged = set(ks[(kv > 0.5) & (ks >= lo) & (ks <= hi)].tolist())
    gsteps, _, gvals = data["grad_norm"]
    hit = np.isin(gsteps, list(flagged))
    if hit.any():
        ax_g.scatter(gsteps[hit], gvals[hit], marker="X", s=70, color=COLORS["fired"], zorder=6,
                     label="spike guard: guard_skipped = 1" if ax_g is ax_first else None)
    for ax in axes[:len(metrics)]:
        ys = [c for c in checkpoints if lo <= c <= hi]
        if ys:
            ax.plot(ys, [0] * len(ys), ls="none", marker="^", ms=7, color="0.35", clip_on=False,
                    transform=ax.get_xaxis_transform(), label="checkpoint saved" if ax is ax_first else None)
    if lr_name is not None:
        ax_r = axes[-1]
        steps, _, values = series(conn, run, rank, lr_name)
        sel = (steps >= lo) & (steps <= hi)
        _plot_series(ax_r, steps[sel], values[sel], rewinds, label_segments=False)
        _draw_markers(ax_r, markers, rewinds, lo, hi, label=False)
        ax_r.set_ylabel(f"learning rate\n(group {lr_name.split('/', 1)[1]})")
        _log_scale(ax_r, values[sel])
        ax_r.grid(True, alpha=0.3, which="both")
    axes[-1].set_xlabel("optimizer step (counts forward through a rewind)")
    ax_first.set_xlim(lo, hi)
    _headroom(ax_first)
    _annotate(ax_first, markers, rewinds, lo, hi)
    ax_first.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    if band is not None:
        ax_first.set_title(f"{title}\nband: {band.describe}" + (f" ({band.note})" if band.note else ""),
                           fontsize=10, loc="left")
    else:
        ax_first.set_title(title, fontsize=10, loc="left")
    fig.savefig(path)
    return path


# -- the report ---------------------------------------------------------------------------------------


def build(store_path: Path, run: str, incident_id: int | None, out_dir: Path,
          rule_paths: list[Path]) -> dict[str, Any]:
    """Write ``report.html`` and its PNGs into ``out_dir``; returns what it found (the ``--json``)."""
    from runwatch.daemon import playbook

    conn = _open_store(store_path)
    try:
        if conn.execute("SELECT 1 FROM runs WHERE name = ?", (run,)).fetchone() is None:
            known = [r for (r,) in conn.execute("SELECT name FROM runs ORDER BY created DESC LIMIT 20")]
            raise ReportError(f"no run named {run!r} in {store_path}" + (
                f"; runs: {', '.join(known)}" if known else "; the store has no runs"), EXIT_USAGE)
        if incident_id is None:
            newest = playbook.incidents(conn, run, limit=1)
            inc = playbook.incident(conn, newest[0]["id"]) if newest else None
        else:
            inc = playbook.incident(conn, incident_id)
            if inc is None:
                ids = [str(i["id"]) for i in playbook.incidents(conn, run)]
                raise ReportError(f"no incident {incident_id} in {store_path}"
                                  + (f"; {run}'s incidents: {', '.join(ids)}" if ids else
                                     f"; run {run!r} has none"), EXIT_USAGE)
            if inc["run"] != run:
                raise ReportError(f"incident {incident_id} belongs to run {inc['run']!r}, not {run!r}",
                                  EXIT_USAGE)
        out_dir.mkdir(parents=True, exist_ok=True)
        return _build(conn, store_path, run, inc, out_dir, rule_paths)
    finally:
        conn.close()


def _build(conn: sqlite3.Connection, store_path: Path, run: str, inc: dict[str, Any] | None, out_dir: Path,
           rule_paths: list[Path]) -> dict[str, Any]:
    from runwatch.daemon import playbook
    from runwatch.daemon.retention import manager as retention

    rank = int(inc["rank"]) if inc and inc.get("rank") is not None else 0
    rows = _timeline(inc) if inc else []
    rewinds = _rewinds(inc) if inc else []
    markers = _markers(rows)
    ckpts = playbook.checkpoints(conn, run)
    control = playbook.run_control(conn, run)
    steps = series(conn, run, rank, "grad_norm")[0]
    first, last = (int(steps[0]), int(steps[-1])) if len(steps) else (0, 0)

    rules, rule_errors = _load_rules(rule_paths)
    band = None
    notes: list[str] = [f"rule file refused: {e}" for e in rule_errors]
    # The incident's own metric gets a panel of its own when it is not one of the usual two.
    focus = inc.get("metric") if inc else None
    focus = focus if focus and focus not in SIGNALS and len(series(conn, run, rank, focus)[0]) else None
    band_metric = focus or (inc["metric"] if inc and inc.get("metric") in SIGNALS else "grad_norm")
    found = find_rule(rules, inc["rule"] if inc else None, band_metric)
    if inc and inc["rule"] not in {lr.rule.name for lr in rules} and inc["rule"] != "person":
        notes.append(f"rule {inc['rule']} is not in the rules at {', '.join(map(str, rule_paths))};"
                     " the band drawn is another rule's")
    if found is not None:
        b_steps, b_times, b_values = series(conn, run, rank, band_metric)
        if len(b_steps):
            band = compute_band(b_steps, b_times, b_values, found[0], found[1], rank, band_metric)
            stored = conn.execute("SELECT rule_version, step, baseline FROM alert_events WHERE run = ? AND"
                                  " rule = ? AND rank = ? AND state = 'firing' ORDER BY id",
                                  (run, found[0].rule.name, rank)).fetchall()
            if any(v != found[0].version for v, _, _ in stored):
                band.note = "the rule was edited after it fired; drawn as it is defined now"
                notes.append(f"rule {found[0].rule.name}: {band.note}")
    # The span shown: from a little before the first rewind target / firing to after the last event.
    if inc and markers:
        points = [m.step for m in markers] + [r.target_step for r in rewinds]
        lo, hi = max(first, min(points) - BEFORE), min(last, max(points) + AFTER)
        if hi - lo < 60:
            lo, hi = max(first, lo - 30), min(last, hi + 30)
    else:
        lo, hi = first, last
    plots = []
    title = (f"run {run}, incident {inc['id']}: {inc['summary']}" if inc else f"run {run}")
    if len(steps):
        if inc:
            plots.append(plot_signals(conn, run, rank, lo, hi, band, markers, rewinds,
                                      [c["step"] for c in ckpts], f"{title} (steps {lo}-{hi})",
                                      out_dir / "incident.png", focus))
        plots.append(plot_signals(conn, run, rank, first, last, band, markers, rewinds,
                                  [c["step"] for c in ckpts], f"run {run}: the whole run, rank {rank}",
                                  out_dir / "run.png", focus))
    else:
        notes.append(f"rank {rank} of run {run} stored no grad_norm: nothing to plot")

    # The recomputed baseline against the one the rule stored when it fired (same rule only).
    band_check = None
    fired_here = [t["detail"] for t in (inc or {}).get("timeline", [])
                  if t["kind"] == "alert" and band is not None and t["detail"].get("rule") == band.rule]
    if band is not None and fired_here:
        step = fired_here[0].get("step")
        at = np.flatnonzero(band.steps == step)
        if len(at):
            band_check = {"step": step, "recomputed": _num(band.center[at[0]]),
                          "stored": fired_here[0].get("baseline")}
    summary: dict[str, Any] = {
        "run": run, "rank": rank, "store": str(store_path), "incident": None, "html": "",
        "plots": [str(p) for p in plots], "steps": [first, last], "shown": [lo, hi],
        "timeline": rows, "rewinds": [asdict(r) for r in rewinds],
        "band": {"rule": band.rule, "metric": band.metric, "describe": band.describe,
                 "at_firing": band_check} if band else None,
        "checkpoints": ckpts, "retention": _retention(retention, conn, run), "control": control,
        "skipped": skipped(conn, run, rank, rewinds, inc),
        "dumped": dumped_batches(inc, conn, run) if inc else [],
        "alerts": _alerts(conn, run), "notes": notes,
    }
    if inc:
        summary["incident"] = {k: inc[k] for k in ("id", "state", "rule", "rank", "metric", "first_step",
                                                     "rewinds", "opened", "updated", "summary")}
    path = out_dir / "report.html"
    path.write_text(render_html(summary))
    summary["html"] = str(path)
    return summary


def _alerts(conn: sqlite3.Connection, run: str) -> list[dict[str, Any]]:
    """The run's newest 500 firings and resolutions, oldest first."""
    cur = conn.execute("SELECT time, rule, severity, state, rank, metric, step, value, baseline, summary"
                       " FROM alert_events WHERE run = ? ORDER BY id DESC LIMIT 500", (run,))
    keys = [d[0] for d in cur.description]
    return [dict(zip(keys, r, strict=True)) for r in cur.fetchall()][::-1]


def _retention(retention: Any, conn: sqlite3.Connection, run: str) -> list[dict[str, Any]]:
    try:
        return list(retention.decisions(conn, run))
    except sqlite3.OperationalError:  # a store from before retention existed
        return []


def _num(x: Any) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


# -- HTML ---------------------------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1300px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #ddd; padding: 3px 8px;
text-align: left; vertical-align: top; } th { background: #f4f4f4; } code { font-size: 12px; }
.ev-fired, .ev-failed, .ev-escalated { color: #b00; font-weight: 600; }
.ev-paused { color: #c60; font-weight: 600; }
.ev-rewound, .ev-resumed { color: #639; font-weight: 600; } .ev-resolved { color: #070; font-weight: 600; }
img { max-width: 100%; border: 1px solid #eee; } .note { color: #a50; } .bad { background: #fee; }
"""


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _table(head: list[str], rows: list[list[Any]], classes: list[str] | None = None) -> str:
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for i, r in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _when(t: float | None) -> str:
    if t is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"


def render_html(s: dict[str, Any]) -> str:
    inc = s["incident"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>runwatch report: {_e(s['run'])}"
             f"{' incident ' + str(inc['id']) if inc else ''}</title><style>{_CSS}</style></head><body>"]
    if inc:
        parts.append(f"<h1>Incident {inc['id']} on run <code>{_e(s['run'])}</code>: {_e(inc['state'])}</h1>")
        parts.append(f"<p>{_e(inc['summary'])}</p>")
        facts = [["rule", _e(inc["rule"])], ["rank / metric", f"{_e(inc['rank'])} / {_e(inc['metric'])}"],
                 ["first step", _e(inc["first_step"])], ["rewinds", _e(inc["rewinds"])],
                 ["opened", _e(_when(inc["opened"]))], ["last change", _e(_when(inc["updated"]))]]
    else:
        parts.append(f"<h1>Run <code>{_e(s['run'])}</code></h1><p>No incident recorded for this run.</p>")
        facts = []
    control = s["control"] or {}
    facts += [["steps stored (rank " + str(s["rank"]) + ")", f"{s['steps'][0]}-{s['steps'][1]}"],
              ["run state now", _e(control.get("state", "unknown"))],
              ["learning-rate scale", _e(control.get("lr_scale", 1.0))],
              ["store", f"<code>{_e(s['store'])}</code>"], ["written", _e(_when(time.time()))]]
    parts.append(_table(["", ""], facts))
    for note in s["notes"]:
        parts.append(f"<p class='note'>{_e(note)}</p>")

    parts.append("<h2>Signals</h2>")
    band = s["band"]
    if band:
        check = band.get("at_firing")
        extra = ""
        if check and check.get("stored") is not None and check.get("recomputed") is not None:
            extra = (f" At step {check['step']} the recomputed baseline is {check['recomputed']:.4g};"
                     f" the rule stored {check['stored']:.4g} when it fired.")
        parts.append(f"<p>Band: {_e(band['describe'])}, recomputed from the stored series with the rule's"
                     f" own baseline code.{_e(extra)}</p>")
    for p in s["plots"]:
        name = Path(p).name
        parts.append(f"<p><img src='{_e(name)}' alt='{_e(name)}'></p>")
    if inc:
        parts.append("<h2>Timeline</h2>")
        t0 = s["timeline"][0]["time"] if s["timeline"] else 0.0
        rows = [[_e(_when(r["time"])), f"+{r['time'] - t0:.3f} s", _e(r["step"]),
                 f"<span class='ev-{_e(r['event']).replace(' ', '-')}'>{_e(r['event'])}</span>",
                 _e(r["text"])] for r in s["timeline"]]
        parts.append(_table(["time", "since firing", "step", "what", "detail"], rows))
        if s["rewinds"]:
            parts.append("<h2>Rewinds</h2>")
            parts.append(_table(
                ["applied before step", "rewind target (checkpoint step)", "checkpoint", "learning rate",
                 "resumed", "refused on the way"],
                [[_e(r["at_step"]), _e(r["target_step"]), f"<code>{_e(r['checkpoint'])}</code>",
                  f"x{r['lr_scale']:g} of the original", "yes" if r["resumed"] else "no (still paused)",
                  _e("; ".join(r["refused"]) or "-")] for r in s["rewinds"]]))
        parts.append("<h2>Dumped batches</h2>")
        parts.append(_dumped_html(s["dumped"], inc))
    parts.append("<h2>What was skipped</h2>")
    parts.append(_skipped_html(s["skipped"]))
    parts.append("<h2>Checkpoints</h2>")
    parts.append(_checkpoints_html(s))
    if s["alerts"]:
        parts.append("<h2>Alerts on this run</h2>")
        parts.append(_table(["time", "rule", "severity", "state", "rank", "step", "summary"],
                            [[_e(_when(a["time"])), _e(a["rule"]), _e(a["severity"]), _e(a["state"]),
                              _e(a["rank"]), _e(a["step"]), _e(a["summary"])] for a in s["alerts"][-100:]]))
    parts.append("<p style='color:#888'>Written by <code>runwatch report</code> from the store,"
                 " read-only.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _dumped_html(dumped: list[dict[str, Any]], inc: dict[str, Any]) -> str:
    if not dumped:
        return "<p>No batch was dumped for this incident.</p>"
    out = []
    rows, classes = [], []
    for d in dumped:
        if d.get("missing"):
            out.append(f"<p class='note'>dump folder {_e(d['folder'])} is not on this machine"
                       f"{': ' + _e(d['error']) if d.get('error') else ''}.</p>")
            continue
        tensors = "<br>".join(f"<code>{_e(k)}</code> {_e(v.get('dtype'))} {_e(v.get('shape'))}"
                              + (f": {_e(v['values'])}" if v.get("values") else "")
                              for k, v in d["tensors"].items())
        culprit = d["step"] == inc["first_step"]
        rows.append([_e(d["step"]) + (" <b>(the step the rule fired on)</b>" if culprit else ""),
                     _e(d["rank"]),
                     _e(d["shard"]), _e(d["offset"]), _e(_fmt(d.get("loss"))), _e(_fmt(d.get("grad_norm"))),
                     tensors, f"<code>{_e(Path(d['folder']) / d['file'])}</code>"])
        classes.append("bad" if culprit else "")
    if rows:
        out.append(_table(["step", "rank", "shard", "offset", "loss at that step", "grad norm at that step",
                           "tensors", "file"], rows, classes))
        out.append("<p>Load one with <code>torch.load(FILE, weights_only=True)</code>: a dict of step, shard,"
                   " offset, args and kwargs as the model's forward received them.</p>")
    return "\n".join(out)


def _fmt(x: Any) -> str:
    return "" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


def _skipped_html(sk: dict[str, Any]) -> str:
    rows = []
    g = sk["guard_skipped_steps"]
    rows.append(["updates the spike guard refused (guard_skipped = 1)",
                 _e(f"{len(g)}: steps {', '.join(map(str, g[:30]))}" + (" ..." if len(g) > 30 else "")
                    if g else "0")])
    for r in sk["rewound_steps"]:
        rows.append([f"optimizer steps undone by the rewind to step {r['from_step']}",
                     _e(f"{r['steps']} (steps {r['from_step']}-{r['to_step']}); their batches are not"
                        " trained again: the data goes on forward")])
        if r["extra_batches_skipped"]:
            rows.append(["more batches the rewind skipped", _e(r["extra_batches_skipped"])])
    c = sk["counters"]
    rows.append(["batches dropped by watch.data() on command (skipped_batches)",
                 _e(f"{c['skipped_batches']} ({c['skipped_samples']} samples,"
                    f" {c['skipped_tokens']} tokens)")])
    rows.append(["shards skipped", _e(", ".join(map(str, sk["shards"])) or "none")])
    return _table(["what", "how much"], rows)


def _checkpoints_html(s: dict[str, Any]) -> str:
    decided = {d["path"]: d for d in s["retention"]}
    targets = {r["target_step"] for r in s["rewinds"]}
    rows = []
    for c in s["checkpoints"]:
        d = decided.get(c["path"])
        verdict = "" if d is None else (f"{'keep' if d['keep'] else 'delete'}: {d['reason']}"
                                        + (f" ({d['state']})" if d.get("state") else ""))
        exists = Path(c["path"]).exists()
        rows.append([_e(c["step"]) + (" <b>(rewind target)</b>" if c["step"] in targets else ""),
                     _e(f"{(c['size_bytes'] or 0) / 1e6:.2f} MB"), _e(_when(c["saved_at"])),
                     _e(verdict or "-"), "yes" if exists else "no (deleted or moved)",
                     f"<code>{_e(c['path'])}</code>"])
    if not rows:
        return "<p>The run registered no checkpoint.</p>"
    return _table(["step", "size", "saved", "retention's last decision", "on disk now", "path"], rows)


# -- the command -------------------------------------------------------------------------------------


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``runwatch report`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "report", help="write an incident (or run) report: HTML with PNG plots",
        description="Write an incident report (or, for a run with none, a run report) as HTML with PNG"
                    " plots, read from the daemon's store: no daemon needs to be running.")
    p.add_argument("run", help="run name")
    p.add_argument("--incident", type=int, metavar="ID",
                   help="incident id (default: the run's newest; none: a run report)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="folder to write into (default ./runwatch-report-RUN[-incident-ID])")
    p.add_argument("--state-dir", type=Path, metavar="DIR",
                   help="the daemon's state folder (default: found as the daemon finds it)")
    p.add_argument("--store", type=Path, metavar="FILE", help="the store file itself (overrides --state-dir)")
    p.add_argument("--config", type=Path, metavar="FILE", help="daemon TOML config, for state_dir and rules")
    p.add_argument("--json", action="store_true", help="print what was found and written as JSON")
    p.set_defaults(func=cmd_report)
    return p


def cmd_report(args: argparse.Namespace) -> int:
    from runwatch.daemon.config import ConfigError, load_settings

    try:
        try:
            settings = load_settings(args.config, state_dir=args.state_dir)
        except ConfigError as exc:
            raise ReportError(str(exc), EXIT_CONFIG) from None
        store_path = args.store or settings.store_path
        out = args.out or Path.cwd() / (f"runwatch-report-{args.run}"
                                        + (f"-incident-{args.incident}" if args.incident is not None else ""))
        summary = build(store_path, args.run, args.incident, out, list(settings.rules))
    except ReportError as exc:
        from runwatch.daemon import cli

        print(f"runwatch report: {exc}", file=sys.stderr)
        return cli.EXIT_CONFIG if exc.code == EXIT_CONFIG else cli.EXIT_USAGE
    if args.json:
        print(json.dumps(_finite(summary), indent=2, sort_keys=True, default=_jsonable))
    else:
        inc = summary["incident"]
        what = (f"incident {inc['id']} ({inc['state']}, rule {inc['rule']})" if inc
                else "the run (no incident)")
        print(f"report on {args.run}, {what}: {summary['html']}")
        for p in summary["plots"]:
            print(f"  plot: {p}")
        for note in summary["notes"]:
            print(f"  note: {note}", file=sys.stderr)
    return 0


def _finite(x: Any) -> Any:
    """NaN and infinities as null: ``--json`` prints strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return _finite(x.item())
    return str(x)
