"""On a GPU: the hooked loop runs under ``torch.cuda.set_sync_debug_mode("error")``.

Skipped where CUDA is absent (CI has no GPU); run on the GPU machine with
``pytest -m gpu tests/test_hook_gpu.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import runwatch.hooks  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_no_host_sync_in_steady_state(tmp_path: Path) -> None:
    """Every default signal, gradient accumulation (micro-batch taps) and the guard in skip mode."""
    from runwatch.hooks.tinygpt import TinyGPT

    torch.manual_seed(0)
    model = TinyGPT(vocab=512, dim=128, layers=4, heads=4, context=128).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    watch = runwatch.hooks.watch(model, optimizer, run="gpu-nosync", socket=tmp_path / "none.sock",
                                 spool_dir=tmp_path, flush_every=8)
    assert watch.guard_mode == "skip"
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, 512, (16, 128), device="cuda", generator=g)
    labels = ids.clone()
    labels[:, 100:] = -100

    def step() -> None:
        for _ in range(2):  # two micro-batches
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            watch.histogram("user_loss", loss.detach(), 0.0, 10.0)  # a user histogram, like the built-ins
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the hook reuses its norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(40):  # warm-up: lazy buffers, pinned pool, first events, micro-batch taps
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(200):
            step()
        # Control: the mode really raises on a sync here, so silence above means none happened.
        with pytest.raises(RuntimeError):
            torch.ones(1, device="cuda").item()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert watch.enabled, "the hook switched itself off: it hit an error (a sync raises here)"
    assert hasattr(watch, "_mb_sq"), "micro-batch taps were installed"
    assert {"seq_length", "output_entropy", "user_loss"} <= set(watch._hists), "histograms were exercised"
    watch.flush(timeout=0.1)
    assert watch.step == 240
    watch.close(timeout=0.1)


def test_rewind_restores_cuda_state_and_control_adds_no_sync(tmp_path: Path) -> None:
    """A watch with a checkpoint folder and a scheduler is still sync-free in steady state, and a
    rewind (applied from a command, as the daemon would send it) restores the CUDA weights."""
    from runwatch.hooks.tinygpt import TinyGPT

    torch.manual_seed(0)
    model = TinyGPT(vocab=512, dim=128, layers=2, heads=4, context=64).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    watch = runwatch.hooks.watch(model, optimizer, run="gpu-rewind", socket=tmp_path / "none.sock",
                                 spool_dir=tmp_path, flush_every=8, checkpoint_dir=tmp_path / "ck",
                                 scheduler=schedule)
    ids = torch.randint(0, 512, (8, 64), device="cuda")

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(20):
        step()
    saved = watch.checkpoint()
    assert saved is not None
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(100):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert watch.enabled
    assert not all(torch.equal(kept[k], v) for k, v in model.state_dict().items())
    watch.control.receive({"origin": "test", "id": 1, "action": "rewind",
                           "args": {"to": saved.step, "lr_scale": 0.5, "resume": True}})
    watch.control.at_step_end(watch.step)  # what the optimizer's post-hook does after a step
    watch._step_start()  # and the next forward's pre-hook: the rewind lands here
    assert watch.control.rewinds == 1 and watch.lr_scale == 0.5
    assert all(torch.equal(kept[k], v) for k, v in model.state_dict().items())
    step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5e-3)
    watch.close(timeout=0.1)
