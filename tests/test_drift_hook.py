"""Drift monitors end to end: the hook's device histograms, the writer's derive stage, and a
real CPU training whose data source switches distribution raising a drift alert."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import REPO, DaemonProcess, cli, cli_run, short_tmpdir

from runwatch.daemon.drift import DriftConfig, fine_counts
from runwatch.daemon.monitors import DriftMonitors, histogram_columns, saved_references, shard_columns
from runwatch.daemon.protocol import Block
from runwatch.daemon.store import Store, StreamInfo
from runwatch.hooks.histograms import DeviceHistogram, hist_keys, signed_log


def test_device_histogram_matches_numpy_fine_counts() -> None:
    g = torch.Generator().manual_seed(0)
    values = torch.randn(5000, generator=g, dtype=torch.float64) * 3
    edges = np.linspace(-4.0, 4.0, 129)
    special = torch.tensor([-4.0, 4.0, -math.inf, math.inf, math.nan, math.nan, 0.0,
                            *edges[[1, 17, 64, 127]].tolist()], dtype=torch.float64)
    values = torch.cat([values, special, values[:100].float().double()])
    h = DeviceHistogram("x", -4.0, 4.0, 128, torch.device("cpu"))
    h.add(values[:3000])
    h.add(values[3000:].float())  # float32 values are binned exactly as their float64 selves
    got = h.take().numpy()
    want = fine_counts(np.concatenate([values[:3000].numpy(), values[3000:].float().double().numpy()]),
                       -4.0, 4.0, 128)
    np.testing.assert_array_equal(got, want)
    assert got.sum() == len(values) - 2  # the NaNs are dropped
    assert got[0] > 0 and got[-1] > 0
    assert h.take().sum() == 0  # zeroed after take


def test_signed_log_grid() -> None:
    x = torch.tensor([-1e6, -1.0, 0.0, 1.0, 1e6])
    y = signed_log(x)
    assert y[2] == 0 and y[1] == -y[3] and y[0] < -8 < 8 < y[4]


def _run_watch(steps: int, model: torch.nn.Module | None = None, shards: int = 0,
               **options: Any) -> list[Any]:
    from runwatch.hooks.watch import Watch
    sent: list[Any] = []

    class Capture:
        dropped_points = 0
        early_commands: list[Any] = []  # noqa: RUF012
        on_command = None

        def put(self, batch: Any) -> None:
            sent.append(batch)

        def put_event(self, event: Any) -> None:
            pass

        def flush(self, timeout: float = 0) -> bool:
            return True

        def close(self, timeout: float = 0) -> None:
            pass

    sys.path.insert(0, str(REPO / "tests"))
    import drift_train

    torch.manual_seed(0)
    model = model or drift_train.Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    w = Watch(model, opt, run="t", sender=Capture(), guard="off", **options)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(0)
    for _ in w.data(range(steps), shard=(lambda i: i // 4 % shards) if shards else None):
        inputs, labels = drift_train.batch(g, 24, 32)
        model(inputs, labels=labels).loss.backward()
        w.histogram("mine", labels.float(), -100.0, 64.0, fine=16)
        opt.step()
        opt.zero_grad()
    w.close()
    return sent


def test_hook_streams_histogram_columns_every_n_steps() -> None:
    sent = _run_watch(8, flush_every=4, histogram_every=4)
    names = set().union(*(b.names for b in sent))
    cols = histogram_columns(tuple(sorted(names)))
    assert set(cols) == {"seq_length", "output_entropy", "activation_values/layers.0",
                         "activation_values/layers.1", "mine"}
    # seq_length grid [0, 33): fine = min(128, seq_len + 1)
    assert len(cols["seq_length"]) == 33 + 2 and len(cols["mine"]) == 18
    for b in sent:
        i = b.names.index(hist_keys("seq_length", 33)[0])
        rows = np.flatnonzero(b.present[:, i]) if b.present is not None else np.arange(len(b.steps))
        assert list(b.steps[rows]) in ([3], [7])  # every 4th step
        seq = b.values[rows][:, [b.names.index(k) for k in hist_keys("seq_length", 33)]]
        # Built-in histograms are filled on one step in HISTOGRAM_STEP_SAMPLE (4): one step's
        # values per flush; the user's histogram takes every step's.
        assert seq.sum() == 64  # one step of 64 samples
        ent = b.values[rows][:, [b.names.index(k) for k in hist_keys("output_entropy", 128)]]
        assert ent.sum() == 256 and ent[0, 0] == 0 and ent[0, -1] == 0
        act = b.values[rows][:, [b.names.index(k) for k in hist_keys("activation_values/layers.0", 128)]]
        assert act.sum() == 1024
        mine = b.values[rows][:, [b.names.index(k) for k in hist_keys("mine", 16)]]
        assert mine.sum() == 4 * 64 * 32  # every step's labels (64 rows of 32)


def test_histograms_can_be_switched_off() -> None:
    sent = _run_watch(4, flush_every=4, histogram_every=0)
    assert not any(n.startswith("hist/") for b in sent for n in b.names)


def test_derive_adds_drift_columns_to_the_window_s_last_step() -> None:
    monitors = DriftMonitors()
    stream = StreamInfo(1, "r", 0, 1, "h", 1, 0, "x")
    keys = hist_keys("x", 8)
    rng = np.random.default_rng(0)
    seen: list[Block] = []
    for step in range(15, 16 * 60, 16):
        mean = 0.0 if step < 600 else 2.0
        counts = fine_counts(rng.normal(mean, 1, 1024), -4, 4, 8).astype(float)
        block = Block(("loss", *keys), np.array([step]), np.array([float(step)]),
                      np.concatenate([[1.0], counts])[None, :])
        seen += monitors.derive(stream, [block]) or [block]
    with_drift = [b for b in seen if "drift_state/x" in b.names]
    assert with_drift and all("drift_psi/x" in b.names and "drift_js/x" in b.names for b in with_drift)
    state = [(int(b.steps[0]), b.values[0, b.names.index("drift_state/x")]) for b in with_drift]
    assert all(s == 0 for step, s in state if step < 600)
    assert any(s == 2 for step, s in state if step >= 600)
    # A replayed block is not counted twice.
    assert monitors.derive(stream, [seen[-1]]) is None


def _alerts(daemon: DaemonProcess, run: str) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-m", "runwatch.daemon", "alerts", "--socket", str(daemon.socket),
           "--run", run, "--limit", "1000", "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return [e for e in json.loads(out.stdout)["recent"] if e["state"] == "firing"]


def test_training_whose_data_shifts_raises_a_drift_alert_and_a_steady_one_does_not() -> None:
    root = short_tmpdir()
    config = root / "runwatch.toml"
    config.write_text("[playbook]\nenabled = false\n")
    daemon = DaemonProcess(root, ["--config", str(config)]).start()
    try:
        for run, shift in (("steady", None), ("shifted", 320)):
            cmd = [sys.executable, str(REPO / "tests" / "drift_train.py"), "--run", run,
                   "--socket", str(daemon.socket), "--steps", "520"]
            subprocess.run(cmd + (["--shift-at", str(shift)] if shift else []), check=True, timeout=120)
        steady = [e for e in _alerts(daemon, "steady") if e["rule"].startswith("drift")]
        assert not steady, [e["summary"] for e in steady]
        shifted = [e for e in _alerts(daemon, "shifted") if e["rule"].startswith("drift")]
        assert shifted, _alerts(daemon, "shifted")
        first = min(shifted, key=lambda e: e["step"])
        print(f"\ndrift alert at step {first['step']} (shift at 320): {first['summary']}")
        # Built-in histograms take one step in 4 (64 samples each): a 1024-value window is 64
        # steps; the tier needs 2 of 3 windows, the first of which may straddle the shift.
        assert 320 <= first["step"] <= 320 + 3 * 64
        assert "drift_state/seq_length" in first["summary"]
        text = daemon.metrics_text()
        assert 'runwatch_train_drift_psi{monitor="seq_length",rank="0",run="shifted"}' in text
        assert "runwatch_train_hist" not in text
    finally:
        daemon.terminate()


def test_a_deep_model_keeps_every_step_row_within_the_protocol() -> None:
    """A 40-block model: activation histograms for 4 evenly spaced blocks only, so the row of a
    histogram step still decodes (an oversized block would be refused and resent forever)."""
    from runwatch.daemon import protocol
    from runwatch.hooks.sender import encode_blocks

    sys.path.insert(0, str(REPO / "tests"))
    import drift_train

    class Deep(drift_train.Tiny):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(40))

    sent = _run_watch(16, model=Deep(), flush_every=16, histogram_every=16)
    names = set().union(*(b.names for b in sent))
    hists = histogram_columns(tuple(sorted(names)))
    assert sorted(n for n in hists if n.startswith("activation_values/")) == \
        sorted(f"activation_values/layers.{i}" for i in (0, 13, 26, 39))
    for batch in sent:
        for block in encode_blocks(batch):
            frame = protocol.samples_frame(1, [block])
            decoded = protocol.SamplesDecoder().decode(frame[protocol.HEADER.size:])
            assert decoded.blocks and len(decoded.blocks[0].names) <= protocol.MAX_METRICS_PER_BLOCK


# --- references that persist, come from step ranges or other runs; shards; token loss -------


def _store(tmp: Path) -> Store:
    return Store.open(tmp / "runwatch.db")


def _write(store: Store, monitors: DriftMonitors, stream: StreamInfo, step: int, counts: np.ndarray,
           name: str = "x") -> dict[str, float]:
    """One histogram row through the derive stage into the store, as the writer does; returns
    the drift values added to it."""
    keys = hist_keys(name, len(counts) - 2)
    block = Block(keys, np.array([step]), np.array([float(step)]), counts.astype(float)[None, :])
    blocks = monitors.derive(stream, [block]) or [block]
    with store.conn:
        for b in blocks:
            set_id = store.metric_set_id(b.names)
            store.insert_rows([(stream.id, step, float(step), set_id, b.values[0].tobytes())])
    return {k: float(v) for b in blocks for k, v in zip(b.names, b.values[0], strict=True)
            if k.startswith("drift_")}


def _normal(rng: np.random.Generator, mean: float = 0.0) -> np.ndarray:
    return fine_counts(rng.normal(mean, 1, 256), -4, 4, 8)


def _cfg(**kw: Any) -> Callable[[], DriftConfig]:
    base = {"lo": 0.0, "hi": 1.0, "warmup_steps": 0, "reference_steps": 64, "min_reference_values": 500,
            "window_values": 512, **kw}
    return lambda: DriftConfig(**base)


def test_a_saved_reference_survives_a_new_monitor_set_on_the_same_store(tmp_path: Path) -> None:
    """What a daemon restart does: new DriftMonitors on the same store resume with the saved
    reference (same counts, bins and steps) instead of learning the shifted data as normal."""
    rng = np.random.default_rng(0)
    store = _store(tmp_path)
    stream = store.register_stream("r", 0, 1, "h", 1, 0, "x")
    first = DriftMonitors(_cfg(), conn=store.conn)
    for step in range(15, 16 * 8, 16):
        _write(store, first, stream, step, _normal(rng))
    ref = first.monitor(stream.id, "x").reference
    assert ref is not None and (ref.first_step, ref.last_step) == (15, 63)
    [saved] = saved_references(store.conn)
    assert (saved.run, saved.rank, saved.monitor, saved.origin) == ("r", 0, "x", "learned")
    assert saved.source == "learned from steps 15-63" and saved.starts == ref.bins.starts
    np.testing.assert_array_equal(saved.counts, ref.fine_counts)
    store.close()

    store = _store(tmp_path)  # the restarted daemon
    second = DriftMonitors(_cfg(), conn=store.conn)
    # The hook replays a step the last daemon had stored: not counted again.
    assert _write(store, second, stream, 127, _normal(rng, 2.0)) == {}
    states = [_write(store, second, stream, step, _normal(rng, 2.0)).get("drift_state/x")
              for step in range(143, 143 + 16 * 8, 16)]
    m = second.monitor(stream.id, "x")
    assert m is not None and m.reference is not None
    assert (m.reference.first_step, m.reference.last_step) == (15, 63)
    assert m.reference.bins == ref.bins
    np.testing.assert_array_equal(m.reference.fine_counts, ref.fine_counts)
    assert 2.0 in states, states  # the shifted data is judged against the old reference
    [d] = second.describe("r")
    assert d["reference"]["origin"] == "learned" and d["reference"]["source"] == "learned from steps 15-63"
    store.close()


@dataclass(frozen=True)
class Rule:
    monitor: str
    run: str = "*"
    steps: tuple[int, int] | None = None
    from_run: str | None = None
    from_rank: int | None = None


def test_configured_references_from_a_step_range_or_another_run(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    store = _store(tmp_path)
    base = store.register_stream("base", 0, 1, "h", 1, 0, "x")
    rules: list[Rule] = []
    monitors = DriftMonitors(_cfg(), lambda: rules, store.conn)
    for step in range(15, 16 * 20, 16):  # the baseline run: shifted data from step 160 on
        _write(store, monitors, base, step, _normal(rng, 0.0 if step < 160 else 3.0))

    # A named step range of another run (read back from the store) ...
    rules[:] = [Rule("x", run="from-range", steps=(160, 319), from_run="base"),
                Rule("x", run="from-saved", from_run="base"),
                Rule("x", run="own-range", steps=(100, 200)),
                Rule("x", run="missing", from_run="nobody")]
    a = store.register_stream("from-range", 0, 1, "h", 1, 0, "x")
    _write(store, monitors, a, 15, _normal(rng, 3.0))
    ma = monitors.monitor(a.id, "x")
    assert ma is not None and ma.reference is not None and ma.phase == "monitoring"
    assert (ma.reference.first_step, ma.reference.last_step) == (175, 319)
    states = [_write(store, monitors, a, s, _normal(rng, 3.0)).get("drift_state/x")
              for s in range(31, 200, 16)]
    assert states and set(states) - {None} == {0.0}  # like the shifted part of base: no drift
    [da] = monitors.describe("from-range")
    assert da["reference"]["origin"] == "config"
    assert da["reference"]["source"] == "steps 175-319 of run base rank 0 ([drift] references)"
    # ... another run's own saved reference (base learned steps 15-63) ...
    b = store.register_stream("from-saved", 0, 1, "h", 1, 0, "x")
    _write(store, monitors, b, 15, _normal(rng))
    mb = monitors.monitor(b.id, "x")
    assert mb is not None and mb.reference is not None
    assert (mb.reference.first_step, mb.reference.last_step) == (15, 63)
    assert monitors.describe("from-saved")[0]["reference"]["source"].startswith(
        "run base rank 0's reference, learned from steps 15-63")
    # ... the run's own range, collected as it arrives (steps before it do not count) ...
    c = store.register_stream("own-range", 0, 1, "h", 1, 0, "x")
    for step in range(15, 16 * 14, 16):
        _write(store, monitors, c, step, _normal(rng, -3.0 if step < 100 else 0.0))
    mc = monitors.monitor(c.id, "x")
    assert mc is not None and mc.reference is not None
    assert (mc.reference.first_step, mc.reference.last_step) == (111, 191)
    assert mc.reference.counts[0] < 20  # the shifted steps before 100 are not in it
    # ... and one that cannot be used says why and learns instead.
    d = store.register_stream("missing", 0, 1, "h", 1, 0, "x")
    _write(store, monitors, d, 15, _normal(rng))
    [dd] = monitors.describe("missing")
    assert dd["phase"] == "reference" and "run 'nobody' rank 0 has no saved reference for 'x'" in dd["note"]
    # The saved spec follows the configuration: entries kept, references kept.
    assert {s.run: s.origin for s in saved_references(store.conn)} == {
        "base": "learned", "from-range": "config", "from-saved": "config", "own-range": "config"}
    store.close()


def test_drift_references_settings_are_validated(tmp_path: Path) -> None:
    from runwatch.daemon.config import ConfigError, load_settings

    cases = {
        '[[drift.references]]\nmonitor = "seq_length"\n': "give steps = [first, last], from_run",
        '[[drift.references]]\nmonitor = "x"\nsteps = [300, 100]\n':
            "steps [300, 100]: need 0 <= first <= last",
        '[[drift.references]]\nmonitor = "x"\nfrom_run = "a b"\n': "from_run 'a b' is not a run name",
        '[[drift.references]]\nmonitor = "x"\nsteps = [1, 2]\nfrom_rank = 1\n': "from_rank needs from_run",
        '[[drift.references]]\nmonitor = "x"\nstep = [1, 2]\n': "setting 'drift.references.0.step'",
    }
    for text, message in cases.items():
        path = tmp_path / "c.toml"
        path.write_text(text)
        with pytest.raises(ConfigError) as err:
            load_settings(path)
        assert message in str(err.value) and "drift.references.0" in str(err.value), str(err.value)
    path.write_text('[drift]\nshard_window_values = 128\n[[drift.references]]\nmonitor = "seq_length"\n'
                    'run = "ft-*"\nsteps = [1000, 2000]\nfrom_run = "pretrain"\n')
    s = load_settings(path)
    [r] = s.drift.references
    assert (r.monitor, r.run, r.steps, r.from_run, r.from_rank) == ("seq_length", "ft-*", (1000, 2000),
                                                                    "pretrain", None)
    from runwatch.daemon.service import drift_config

    assert drift_config(s).shard_window_values == 128


def test_token_loss_sample_is_the_cross_entropy_at_sampled_positions() -> None:
    from runwatch.hooks.histograms import Sampler, token_loss_sample

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 9, 11, generator=g)
    labels = torch.randint(0, 11, (3, 9), generator=g)
    labels[0, 4:] = -100
    labels[2, 1] = 57  # out of the vocabulary: skipped, not an index error
    for shift in (True, False):
        got = token_loss_sample(logits, labels, Sampler(torch.device("cpu")), shift=shift, ignore_index=-100)
        pos = Sampler(torch.device("cpu")).positions(3 * (8 if shift else 9), 256)
        b, t = (pos // 8, pos % 8) if shift else (pos // 9, pos % 9)
        target = labels[b, t + 1] if shift else labels[b, t]
        valid = (target >= 0) & (target < 11)
        want = torch.nn.functional.cross_entropy(logits[b, t][valid], target[valid], reduction="none")
        assert torch.isnan(got[~valid]).all() and (~valid).any()
        torch.testing.assert_close(got[valid], want)


def test_token_loss_refuses_calls_that_cannot_be_right() -> None:
    from runwatch.hooks.histograms import check_token_loss

    logits, labels = torch.zeros(2, 5, 7), torch.zeros(2, 5, dtype=torch.long)
    bad = {
        (logits, labels, None, None): "say how they align with the logits: shift=True",
        (logits, labels[:, :4], True, None): "labels of shape (2, 4) do not match logits of shape (2, 5, 7)",
        (logits, labels.float(), True, None): "labels must be an integer tensor",
        (torch.zeros(10), None, True, None): "shift= applies to logits with labels",
        (torch.zeros(10), None, None, torch.ones(9, dtype=torch.bool)): "mask must be a tensor of the",
        (labels, None, None, None): "the first argument must be a float tensor",
        (torch.zeros(2, 1, 7), torch.zeros(2, 1, dtype=torch.long), True, None): "at least 2 positions",
    }
    for (v, lab, shift, mask), message in bad.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            check_token_loss(v, lab, shift, mask)
    check_token_loss(logits, labels, False, None)
    check_token_loss(torch.zeros(10), None, None, torch.ones(10, dtype=torch.bool))


def test_hook_streams_token_loss_and_shard_slots() -> None:
    """``token_loss="aligned"`` fills token_loss from the forward's logits and labels (padding
    skipped); ``watch.data(..., shard=)`` fills one fixed slot per shard read in a flush, named
    by its id; ``watch.token_loss(losses, mask=...)`` does the same for losses you computed."""
    sent = _run_watch(16, flush_every=16, histogram_every=16, token_loss="aligned", shards=3)
    names = tuple(sorted(set().union(*(b.names for b in sent))))
    assert "token_loss" in histogram_columns(names)
    slots = shard_columns(names)["seq_length"]
    assert len(slots) == 3 and "seq_length@shard0" not in histogram_columns(names)
    [b] = [b for b in sent if hist_keys("token_loss", 128)[0] in b.names]
    row = b.values[-1]
    loss = row[[b.names.index(k) for k in hist_keys("token_loss", 128)]]
    # 4 sampled steps x 256 positions, minus those on padding (labels -100: 1/32 to 8/32 of them)
    assert 600 < loss.sum() < 1024 and loss[0] == 0
    seq = row[[b.names.index(k) for k in hist_keys("seq_length", 33)]]
    ids = sorted(row[b.names.index(f"hist/seq_length@shard{j}/id")] for j in range(3))
    per_slot = [row[[b.names.index(k) for k in hist_keys(f"seq_length@shard{j}", 33)]].sum()
                for j in range(3)]
    # Shards take 4 steps each in turn (0, 1, 2, 0): sampled steps 0, 4, 8, 12 -> shards 0, 1, 2, 0.
    assert ids == [0.0, 1.0, 2.0] and sorted(per_slot) == [64, 64, 128] and seq.sum() == 256


def test_token_loss_method_with_per_token_losses_and_mask() -> None:
    from runwatch.hooks.watch import Watch

    sys.path.insert(0, str(REPO / "tests"))
    import drift_train

    sent: list[Any] = []

    class Capture:
        dropped_points = 0
        early_commands: list[Any] = []  # noqa: RUF012
        on_command = None

        def put(self, batch: Any) -> None:
            sent.append(batch)

        def put_event(self, event: Any) -> None: ...
        def flush(self, timeout: float = 0) -> bool: return True
        def close(self, timeout: float = 0) -> None: ...

    model = drift_train.Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    w = Watch(model, opt, run="t", sender=Capture(), guard="off", flush_every=4, histogram_every=4)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        inputs, labels = drift_train.batch(g, 24, 32)
        out = model(inputs, labels=labels)
        losses = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), labels.flatten(),
                                                   reduction="none")
        w.token_loss(losses, mask=labels.flatten() != -100)
        with pytest.raises(ValueError, match="say how they align"):
            w.token_loss(out.logits, labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    assert w.enabled  # a refused call raised to the caller and left monitoring on
    w.close()
    [b] = [b for b in sent if hist_keys("token_loss", 128)[0] in b.names]
    counts = b.values[-1][[b.names.index(k) for k in hist_keys("token_loss", 128)]]
    assert 200 < counts.sum() < 256 and counts[1] < 20  # masked zeros are not counted as loss 0


FAST_DRIFT = ("[playbook]\nenabled = false\n[drift]\nwarmup_steps = 0\nreference_steps = 64\n"
              "min_reference_values = 512\nwindow_values = 512\nshard_window_values = 128\n")


def _train(daemon: DaemonProcess, run: str, *args: str) -> None:
    cmd = [sys.executable, str(REPO / "tests" / "drift_train.py"), "--run", run, "--socket",
           str(daemon.socket), *args]
    subprocess.run(cmd, check=True, timeout=120)


def _seq_length(daemon: DaemonProcess, run: str, via_cli: bool = False) -> dict[str, Any]:
    reply = cli(daemon, "drift", "list", "--run", run) if via_cli else daemon.query("drift", run=run)
    [m] = [m for m in reply["monitors"] if m["monitor"] == "seq_length"]
    return m


def test_a_reference_survives_kill_9_and_a_stored_step_range_can_replace_it() -> None:
    """The second daemon judges the shifted data against the reference the first one learned:
    were it learned again, the shifted data would become the reference and nothing would fire."""
    root = short_tmpdir()
    config = root / "runwatch.toml"
    config.write_text(FAST_DRIFT)
    daemon = DaemonProcess(root, ["--config", str(config)]).start()
    try:
        _train(daemon, "r", "--steps", "96")
        before = _seq_length(daemon, "r", via_cli=True)
        assert before["phase"] == "monitoring" and before["reference"]["origin"] == "learned"
        daemon.kill9()
        daemon = DaemonProcess(root, ["--config", str(config)]).start()
        _train(daemon, "r", "--start-step", "96", "--steps", "128", "--shift-at", "0")
        after = _seq_length(daemon, "r")
        assert after["reference"] == before["reference"], (before, after)
        assert "resumes with its saved reference (learned from steps" in daemon.log()
        fired = [e for e in _alerts(daemon, "r") if e["rule"] == "drift_critical"]
        assert fired and min(e["step"] for e in fired) >= 96, fired
        print(f"\nafter kill -9: reference {after['reference']['source']}; critical at step "
              f"{min(e['step'] for e in fired)} (data shifted from step 96)")

        # A person freezes it anew from a stored step range of the run (here: the shifted part).
        reply = cli(daemon, "drift", "freeze", "r", "seq_length", "--steps", "130:240")
        [f] = reply["frozen"]
        assert f["live"] and (f["first_step"], f["last_step"]) == (143, 223)
        assert f["source"] == "steps 143-223 of run r rank 0 (runwatch drift freeze by uid 0)"
        now = _seq_length(daemon, "r")
        assert now["reference"]["origin"] == "cli" and now["reference"]["first_step"] == 143
        # Bad requests say what is wrong.
        bad = cli_run(daemon, "drift", "freeze", "r", "seq_length", "--from-run", "ghost")
        assert bad.returncode != 0
        assert "run 'ghost' rank 0 has no saved reference for 'seq_length'" in bad.stderr
        refused = daemon.query("drift_freeze", run="r", monitor="nothing_here", steps="0:10")
        assert refused["error"] == "run 'r' has no drift monitor matching 'nothing_here'"
        refused = daemon.query("drift_freeze", run="r", monitor="seq_length", steps="10-20")
        assert "give FIRST:LAST" in refused["error"]
        refused = daemon.query("drift_freeze", run="r", monitor="seq_length", steps="0:10")
        assert refused["error"].startswith(
            "run 'r' rank 0 has no stored histogram 'seq_length' in steps 0-10")
    finally:
        daemon.terminate()


def test_a_data_shard_from_another_distribution_is_named() -> None:
    root = short_tmpdir()
    config = root / "runwatch.toml"
    config.write_text(FAST_DRIFT)
    daemon = DaemonProcess(root, ["--config", str(config)]).start()
    try:
        # 4 shards read in turn, 8 steps each; shard 2 sends short rows from step 96 on.
        _train(daemon, "s", "--steps", "320", "--shards", "4", "--bad-shard", "2", "--shift-at", "96")
        fired = [e for e in _alerts(daemon, "s") if e["rule"] == "drift_shard_critical"]
        assert fired, _alerts(daemon, "s")
        first = min(fired, key=lambda e: e["step"])
        print(f"\nshard alert at step {first['step']}: {first['summary']}")
        assert first["summary"].startswith("data shard 2 is far from the reference")
        # Shard 2's turns after the shift: steps 104-111, 136-143, ...; 2 of 3 windows (one a turn).
        assert 104 <= first["step"] <= 104 + 3 * 32
        worst = _seq_length(daemon, "s")["worst_shard"]
        assert worst["shard"] == 2 and worst["state"] == 2
        assert 'runwatch_train_drift_state{monitor="seq_length@shards",rank="0",run="s"} 2.0' in \
            daemon.metrics_text()
    finally:
        daemon.terminate()


def test_shifted_token_loss_is_what_hugging_face_causal_lms_average(monkeypatch: pytest.MonkeyPatch) -> None:
    """``token_loss="shifted"`` (what to pass to ``RunwatchCallback`` for a ``*ForCausalLM``):
    over every position, the hook's per-token losses average to the loss transformers computes;
    ``aligned`` would not (so the choice is the user's to state, not the hook's to guess)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    from runwatch.hooks import histograms

    class Every(histograms.Sampler):
        def positions(self, high: int, k: int) -> torch.Tensor:
            return torch.arange(high)

    monkeypatch.setattr(histograms, "ENTROPY_POSITIONS", 10**6)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 9, 11, generator=g) * 3
    labels = torch.randint(0, 11, (3, 9), generator=g)
    labels[0, 5:] = -100
    hf = float(ForCausalLMLoss(logits, labels, vocab_size=11))
    shifted, aligned = (float(histograms.token_loss_sample(logits, labels, Every(torch.device("cpu")),
                                                           shift=s, ignore_index=-100).nanmean())
                        for s in (True, False))
    assert shifted == pytest.approx(hf, rel=1e-6) and abs(aligned - hf) > 0.1
