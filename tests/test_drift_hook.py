"""Drift monitors end to end: the hook's device histograms, the writer's derive stage, and a
real CPU training whose data source switches distribution raising a drift alert."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from typing import Any

import numpy as np
import torch
from conftest import REPO, DaemonProcess, short_tmpdir

from runwatch.daemon.drift import fine_counts
from runwatch.daemon.monitors import DriftMonitors, histogram_columns
from runwatch.daemon.protocol import Block
from runwatch.daemon.store import StreamInfo
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


def _run_watch(steps: int, model: torch.nn.Module | None = None, **options: Any) -> list[Any]:
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
    for _ in range(steps):
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
