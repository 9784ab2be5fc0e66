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
    watch.flush(timeout=0.1)
    assert watch.step == 240
    watch.close(timeout=0.1)
