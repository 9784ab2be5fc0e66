"""The spike guard: a refused update leaves the model and optimizer exactly as they were."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from runwatch.daemon.store import Store, series
from tests.conftest import DaemonProcess

torch = pytest.importorskip("torch")

import runwatch.hooks  # noqa: E402
from runwatch.hooks.guard import SpikeGuard  # noqa: E402
from runwatch.hooks.tinygpt import TinyGPT, batches  # noqa: E402


def _snapshot(model, opt) -> tuple[list, dict]:
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def _identical(a, b) -> bool:
    params_a, state_a = a
    params_b, state_b = b
    if not all(torch.equal(x, y) for x, y in zip(params_a, params_b, strict=True)):
        return False
    for key, sa in state_a["state"].items():
        sb = state_b["state"][key]
        for name in sa:
            if not torch.equal(torch.as_tensor(sa[name]), torch.as_tensor(sb[name])):
                return False
    return True


def _train(model, opt, data, n: int, scale: float = 1.0) -> None:
    for _ in range(n):
        x, y = next(data)
        (model(x, labels=y).loss * scale).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_fused_optimizer_skip_is_bit_identical_and_reported(daemon: DaemonProcess, optimizer: str) -> None:
    torch.manual_seed(0)
    model = TinyGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True) if optimizer == "adamw" else \
        torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, fused=True)
    run = f"guard-{optimizer}"
    watch = runwatch.hooks.watch(model, opt, run=run, socket=daemon.socket, flush_every=4,
                                 guard_window=16, guard_warmup=8)
    assert watch.guard_mode == "skip", "auto means skip for a fused optimizer"
    data = batches(0)
    _train(model, opt, data, 12)
    before = _snapshot(model, opt)
    _train(model, opt, data, 1, scale=1e4)  # a gradient spike
    assert _identical(before, _snapshot(model, opt)), "the spiking update reached the weights"
    x, y = next(data)
    (model(x, labels=y).loss * float("nan")).backward()  # NaN always counts
    opt.step()
    opt.zero_grad()
    assert _identical(before, _snapshot(model, opt))
    _train(model, opt, data, 2)  # healthy again: updates apply
    assert not _identical(before, _snapshot(model, opt))
    assert not hasattr(opt, "found_inf"), "the guard cleans up after itself"
    assert watch.flush()
    steps, skipped = series(Store.reader(daemon.store_path), run, 0, "guard_skipped")
    assert steps.tolist() == list(range(16))
    assert skipped.tolist() == [0.0] * 12 + [1.0, 1.0, 0.0, 0.0]
    _, norm = series(Store.reader(daemon.store_path), run, 0, "grad_norm")
    _, threshold = series(Store.reader(daemon.store_path), run, 0, "guard_threshold")
    assert norm[12] > threshold[12] and np.isnan(norm[13])
    assert np.isinf(threshold[:8]).all(), "not armed during warm-up"
    watch.close()


def test_non_fused_defaults_to_observe_and_skip_needs_consent(daemon: DaemonProcess) -> None:
    model = TinyGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="skip_sync"):
        runwatch.hooks.watch(model, opt, run="nf", socket=daemon.socket, guard="skip")
    watch = runwatch.hooks.watch(model, opt, run="nf", socket=daemon.socket, guard_warmup=4,
                                 guard_window=8)
    assert watch.guard_mode == "observe"
    data = batches(0)
    _train(model, opt, data, 6)
    before = _snapshot(model, opt)
    _train(model, opt, data, 1, scale=1e4)
    assert not _identical(before, _snapshot(model, opt)), "observe mode does not skip"
    assert watch.flush()
    _, skipped = series(Store.reader(daemon.store_path), "nf", 0, "guard_skipped")
    assert skipped[-1] == 1.0, "but the spike is reported"
    watch.close()


def test_skip_sync_skips_any_optimizer(daemon: DaemonProcess) -> None:
    torch.manual_seed(0)
    model = TinyGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    watch = runwatch.hooks.watch(model, opt, run="sync", socket=daemon.socket, guard="skip_sync",
                                 guard_warmup=4, guard_window=8)
    data = batches(0)
    _train(model, opt, data, 6)
    before = _snapshot(model, opt)
    _train(model, opt, data, 1, scale=1e4)
    assert _identical(before, _snapshot(model, opt))
    assert watch.step == 7 and watch.skipped_steps_requested == 1
    watch.close()
    assert opt.step.__func__ is torch.optim.AdamW.step  # type: ignore[attr-defined]


def test_guard_baseline_ignores_spikes_and_ratio_form() -> None:
    guard = SpikeGuard(torch.device("cpu"), window=8, warmup=4, sigma=6.0)
    decisions = [bool(guard.check(torch.tensor(v))[0]) for v in [1.0, 1.1, 0.9, 1.0, 1.05, 50.0, 1.0]]
    assert decisions == [False] * 5 + [True, False]
    assert int(guard.count) == 6, "the spike did not enter the baseline"
    ratio = SpikeGuard(torch.device("cpu"), window=8, warmup=3, ratio=5.0)
    decisions = [bool(ratio.check(torch.tensor(v))[0]) for v in [1.0, 1.0, 1.0, 4.0, 6.0]]
    assert decisions == [False, False, False, False, True]
