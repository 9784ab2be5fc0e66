"""Signal values that arrive at a live daemon, checked against independent computations."""

from __future__ import annotations

import numpy as np
import pytest

from runwatch.daemon.store import Store, series
from tests.conftest import DaemonProcess

torch = pytest.importorskip("torch")

import runwatch.hooks  # noqa: E402
from runwatch.hooks.tinygpt import TinyGPT, batches  # noqa: E402


class MaskedLM(torch.nn.Module):
    """A tiny LM with the Hugging Face calling convention (input_ids, attention_mask, labels)."""

    def __init__(self) -> None:
        super().__init__()
        self.gpt = TinyGPT()

    def forward(self, input_ids, attention_mask=None, labels=None):
        out = self.gpt(input_ids, labels=labels)
        return out


def _fetch(daemon: DaemonProcess, run: str, key: str, rank: int = 0) -> np.ndarray:
    return series(Store.reader(daemon.store_path), run, rank, key)[1]


def test_group_norms_add_up_and_match_clip_grad_norm(daemon: DaemonProcess) -> None:
    torch.manual_seed(0)
    model = TinyGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    watch = runwatch.hooks.watch(model, opt, run="groups", socket=daemon.socket, flush_every=4)
    data, expected = batches(0), []
    for _ in range(10):
        x, y = next(data)
        model(x, labels=y).loss.backward()
        expected.append(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")).item())
        opt.step()
        opt.zero_grad()
    assert watch.flush()
    total = _fetch(daemon, "groups", "grad_norm")
    np.testing.assert_allclose(total, expected, rtol=1e-5)
    groups = ["blocks.0", "blocks.1", "embeddings", "head", "other"]
    parts = np.stack([_fetch(daemon, "groups", f"group_grad_norm/{g}") for g in groups])
    np.testing.assert_allclose(np.sqrt((parts ** 2).sum(axis=0)), total, rtol=1e-5)
    assert parts[3][-1] > 0, "the head has a gradient of its own"
    watch.close()


def test_token_efficiency_is_the_mask_mean_and_throughput_is_counted(daemon: DaemonProcess) -> None:
    torch.manual_seed(1)
    model = MaskedLM()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    watch = runwatch.hooks.watch(model, opt, run="tokens", socket=daemon.socket, flush_every=3)
    data, means = batches(1), []
    for step in range(6):
        x, _ = next(data)
        mask = torch.ones_like(x)
        mask[:, 32 - 4 * step:] = 0  # more padding every step
        out = model(input_ids=x, attention_mask=mask, labels=None)
        out.logits.square().mean().backward()  # no labels: efficiency comes from the mask
        opt.step()
        opt.zero_grad()
        means.append(mask.float().mean().item())
    assert watch.flush()
    np.testing.assert_allclose(_fetch(daemon, "tokens", "token_efficiency"), means, rtol=1e-12)
    assert set(_fetch(daemon, "tokens", "tokens").tolist()) == {8 * 32}
    assert set(_fetch(daemon, "tokens", "samples").tolist()) == {8}
    tps = _fetch(daemon, "tokens", "tokens_per_second")
    dt = _fetch(daemon, "tokens", "step_duration_seconds")
    np.testing.assert_allclose(tps, 256 / dt, rtol=1e-9)
    watch.close()


def _accumulate(model, opt, data, steps: int, poison_step: int) -> tuple[list[float], list[float]]:
    """Four micro-batches a step; micro-batch 1 of ``poison_step`` is scaled up 20x.

    Reference norms come from the change of ``.grad`` across each backward.
    """
    params = list(model.parameters())
    ref_mean, ref_std = [], []
    for step in range(steps):
        norms = []
        for micro in range(4):
            x, y = next(data)
            before = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
            loss = model(x, labels=y).loss * (20.0 if step == poison_step and micro == 1 else 1.0)
            loss.backward()
            delta = torch.sqrt(sum((p.grad - b).square().sum() for p, b in zip(params, before, strict=True)))
            norms.append(delta.item())
        opt.step()
        opt.zero_grad()
        ref_mean.append(float(np.mean(norms)))
        ref_std.append(float(np.std(norms)))
    return ref_mean, ref_std


def test_microbatch_spread_shows_one_poisoned_microbatch(daemon: DaemonProcess) -> None:
    """Rising variance with a stable mean is what a few poisoned examples look like."""
    torch.manual_seed(2)
    model = TinyGPT()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    watch = runwatch.hooks.watch(model, opt, run="micro", socket=daemon.socket, flush_every=2,
                                 microbatch_norms=True)
    ref_mean, ref_std = _accumulate(model, opt, batches(2), 4, poison_step=3)
    assert watch.flush()
    np.testing.assert_allclose(_fetch(daemon, "micro", "microbatch_grad_norm"), ref_mean, rtol=1e-4)
    std = _fetch(daemon, "micro", "microbatch_grad_norm_std")
    np.testing.assert_allclose(std, ref_std, rtol=1e-3, atol=1e-6)
    assert std[3] > 5 * max(std[:3]), "the poisoned micro-batch stands out"
    assert len(_fetch(daemon, "micro", "loss")) == 4
    watch.close()


def test_microbatch_norms_switch_on_when_accumulation_is_seen(daemon: DaemonProcess) -> None:
    torch.manual_seed(2)
    model = TinyGPT()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    watch = runwatch.hooks.watch(model, opt, run="auto-micro", socket=daemon.socket, flush_every=2)
    ref_mean, _ = _accumulate(model, opt, batches(2), 3, poison_step=-1)
    assert watch.flush()
    steps, mean = series(Store.reader(daemon.store_path), "auto-micro", 0, "microbatch_grad_norm")
    assert steps.tolist() == [1, 2], "step 0, whose first micro-batch went unseen, is not reported"
    np.testing.assert_allclose(mean, ref_mean[1:], rtol=1e-4)
    watch.close()


def test_activation_norms_fingerprints_and_recent_batches(daemon: DaemonProcess) -> None:
    torch.manual_seed(3)
    model = TinyGPT()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    seen: list[float] = []
    model.blocks[1].register_forward_hook(
        lambda m, i, o: seen.append((o.detach().square().mean().sqrt()).item()))
    watch = runwatch.hooks.watch(model, opt, run="acts", socket=daemon.socket, flush_every=5,
                                 keep_batches=3)
    data = batches(3)
    first = next(data)
    for x, y in [first, next(data), first, next(data), next(data)]:
        model(x, labels=y).loss.backward()
        opt.step()
        opt.zero_grad()
    assert watch.flush()
    np.testing.assert_allclose(_fetch(daemon, "acts", "activation_norm/blocks.1"), seen, rtol=1e-5)
    fp = _fetch(daemon, "acts", "batch_fingerprint")
    assert fp[0] == fp[2] and len(set(fp.tolist())) == 4 and all(0 <= v < 2**31 for v in fp)
    recent = watch.recent_batches()
    assert [b.step for b in recent] == [2, 3, 4]
    watch.close()


def test_explicit_layers_and_unknown_layer_is_refused(daemon: DaemonProcess) -> None:
    model = TinyGPT()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match=r"no module named 'blocks\.9'"):
        runwatch.hooks.watch(model, opt, run="l", socket=daemon.socket, layers=["blocks.9"])
    watch = runwatch.hooks.watch(model, opt, run="layers", socket=daemon.socket, layers=["ln", model.head])
    x, y = next(batches(0))
    model(x, labels=y).loss.backward()
    opt.step()
    assert watch.flush()
    conn = Store.reader(daemon.store_path)
    names = {n for (n,) in conn.execute("SELECT names FROM metric_sets")}
    keys = set("\n".join(names).split("\n"))
    assert {"activation_norm/ln", "activation_norm/head"} <= keys
    assert "activation_norm/blocks.0" not in keys
    watch.close()
