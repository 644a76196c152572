"""trainer.async_save's pieces: the copy that checksums what it writes, and the estimate of a rank's checkpoint
share that decides whether the stage in host memory has room (the whole path: tests/integration/test_async_save.py)."""

from __future__ import annotations

import zlib

import torch

from distsft.trainer.async_save import copy_with_crc, local_state_bytes


def test_copy_with_crc_copies_and_checksums_what_it_wrote(tmp_path):
    data = torch.randint(0, 256, (3 << 20,), dtype=torch.uint8).numpy().tobytes()  # more than one chunk
    (tmp_path / "a").write_bytes(data)
    crc = copy_with_crc(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b").read_bytes() == data and crc == zlib.crc32(data)


def test_local_state_bytes_counts_weights_and_adam_state_once():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8, bias=False))
    n = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters())
    assert local_state_bytes(model, opt) == 4 * n  # no state before the first step; parameters counted once
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    # + exp_avg and exp_avg_sq (fp32) and one 0-d step tensor per parameter
    assert local_state_bytes(model, opt) == 4 * n + 8 * n + 4 * len(list(model.parameters()))
