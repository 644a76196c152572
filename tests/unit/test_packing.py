"""Packing: invariants, the docstring's worked example, and packed == alone (with negative controls)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distsft.data.collate import TokenStore, collate_packed, model_inputs
from distsft.data.packing import best_fit_decreasing
from distsft.data.tokenize import IGNORE
from tests.helpers import epoch_rows, per_token_ce, tokenize_messages


def test_bfd_invariants_and_determinism():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(4, 0.8, 2000).astype(int), 1, 512)
    rows = best_fit_decreasing(lengths, 512, seed=3)
    flat = sorted(i for r in rows for i in r)
    assert flat == list(range(len(lengths)))  # every example exactly once
    assert max(lengths[r].sum() for r in rows) <= 512  # no row over budget
    assert rows.tolist() == best_fit_decreasing(lengths, 512, seed=3).tolist()  # same seed, same rows
    assert lengths.sum() / (len(rows) * 512) > 0.98
    e0, e1 = epoch_rows(rows, 3, 0), epoch_rows(rows, 3, 1)
    e0, e1 = [r.tolist() for r in e0], [r.tolist() for r in e1]
    assert e0 != e1 and sorted(map(tuple, e0)) == sorted(map(tuple, e1))  # reshuffled, same rows


def reference_bfd(lengths, max_seq_len, seed):
    """Best-fit decreasing written plainly (a list per row), the definition the vector version must match."""
    import bisect

    order = np.lexsort((np.random.default_rng(seed).permutation(len(lengths)), -lengths))
    free, rows = [], []
    for idx in order.tolist():
        n = int(lengths[idx])
        pos = bisect.bisect_left(free, (n, -1))
        space, row = free.pop(pos) if pos < len(free) else (max_seq_len, len(rows))
        if row == len(rows):
            rows.append([])
        rows[row].append(idx)
        if space > n:
            bisect.insort(free, (space - n, row))
    return rows


@pytest.mark.parametrize("seed", [0, 5])
def test_bfd_rows_as_vectors_equal_the_plain_definition(seed):
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(5, 0.7, 5000).astype(np.int64), 1, 1024)
    rows = best_fit_decreasing(lengths, 1024, seed)
    assert rows.tolist() == reference_bfd(lengths, 1024, seed)
    assert rows.offsets.dtype == rows.items.dtype == np.int64 and len(rows.items) == len(lengths)


def test_docstring_example():
    assert best_fit_decreasing(np.array([5, 3, 4, 2]), 8, seed=0).tolist() == [[0, 1], [2, 3]]
    store = TokenStore([[11, 12, 13], [21, 22], [31, 32, 33, 34]],
                       [[IGNORE, 12, 13], [IGNORE, 22], [IGNORE, 32, 33, 34]])
    b = collate_packed(store, [[0, 1], [2]], pad_id=0)
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert b["labels"].tolist() == [[IGNORE, 12, 13, IGNORE, 22], [IGNORE, 32, 33, 34, IGNORE]]
    assert b["cu_seqlens"].tolist() == [0, 3, 5, 9, 10] and int(b["max_seqlen"]) == 4
    assert "cu_seqlens" not in model_inputs(b) and "labels" not in model_inputs(b)


@pytest.fixture
def docs(tokenizer):
    from distsft.assets.build import make_examples

    exs = make_examples(12, seed=7)
    return [tokenize_messages(tokenizer, e["messages"], "assistant") for e in exs]


@pytest.mark.parametrize("attn", ["sdpa", "eager", "varlen"])
def test_packed_equals_alone_with_negative_controls(docs, attn):
    from distsft.model.attention import VARLEN
    from distsft.model.load import load_model
    from tests.conftest import typed_cfg

    mcfg = typed_cfg(f"model.attn_implementation={attn}").model
    model = load_model(mcfg, seed=0).eval()
    varlen = model.config._attn_implementation == VARLEN
    assert varlen == (attn == "varlen")
    store = TokenStore([d["input_ids"] for d in docs], [d["labels"] for d in docs])
    rows = best_fit_decreasing(store.lengths, 160, seed=0)
    assert len(rows) > 1 and max(len(r) for r in rows) > 2  # micro-batch > 1, several docs per row
    batch = collate_packed(store, rows, pad_id=0)
    packed_logits = model(**model_inputs(batch, varlen), use_cache=False).logits
    packed = per_token_ce(packed_logits, batch["labels"])  # [B, T-1]

    for b, row in enumerate(rows):  # each document run alone must give the same token losses
        t = 0
        for i in row:
            x, y = store.example(i)
            alone_logits = model(input_ids=torch.from_numpy(x)[None], use_cache=False).logits
            alone = per_token_ce(alone_logits, torch.from_numpy(y)[None])
            n = len(x)
            torch.testing.assert_close(packed[b, t:t + n - 1], alone[0], rtol=1e-5, atol=1e-5)
            t += n
    # gradients too: the packed step's gradient equals the sum over documents run alone
    model.zero_grad()
    packed.sum().backward()
    g_packed = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    for i in range(len(store)):
        x, y = store.example(i)
        per_token_ce(model(input_ids=torch.from_numpy(x)[None], use_cache=False).logits,
                     torch.from_numpy(y)[None]).sum().backward()
    g_alone = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert ((g_packed - g_alone).norm() / g_alone.norm()).item() <= 1e-5

    if varlen:  # negative control: one document spanning each whole row = plain causal attention
        plain = dict(batch, cu_seqlens=torch.arange(len(rows) + 1, dtype=torch.int32) * batch["input_ids"].shape[1],
                     max_seqlen=torch.tensor(batch["input_ids"].shape[1]))
        with torch.no_grad():
            leaky = model(**model_inputs(plain, True), use_cache=False).logits
        assert (per_token_ce(leaky, batch["labels"]) - packed.detach()).abs().max() >= 1e-2
        return
    # negative controls: a plain causal mask, or the KV cache, lets documents attend to each other
    with torch.no_grad():
        masked = model(**model_inputs(batch), attention_mask=torch.ones_like(batch["input_ids"]),
                       use_cache=False).logits
        cached = model(**model_inputs(batch), use_cache=True).logits
    for leaky in (masked, cached):
        assert (per_token_ce(leaky, batch["labels"]) - packed.detach()).abs().max() >= 1e-2
