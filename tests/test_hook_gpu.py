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


def _model() -> torch.nn.Module:
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(),
                                            torch.nn.Linear(1024, 256))

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
            out = self.body(x)
            return {"loss": torch.nn.functional.mse_loss(out, y), "out": out}

    return Net().cuda()


def test_no_host_sync_in_steady_state(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    watch = runwatch.hooks.watch(model, optimizer, run="gpu-nosync", socket=tmp_path / "none.sock",
                                 spool_dir=tmp_path, flush_every=8)
    x = torch.randn(64, 256, device="cuda")
    y = torch.randn(64, 256, device="cuda")

    def step() -> None:
        loss = model(x, y)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(40):  # warm-up: lazy buffers, pinned pool, first events
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
    watch.flush(timeout=0.1)
    assert watch.step == 240
    watch.close(timeout=0.1)
