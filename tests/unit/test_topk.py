"""Top-k packing and any-temperature reconstruction against the dense softmax."""

import math

import pytest
import torch

from distill.teacher_cache.topk import pack_topk, rebuild_log_probs, topk_mass


def _logits(n=64, c=100, scale=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * scale


def _store(ids, vals, tail):
    """What the Parquet file holds: fp16 logits, fp32 tail, int16 ids."""
    return ids.to(torch.int16), vals.to(torch.float16), tail.to(torch.float32)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_full_k_matches_dense_softmax_at_any_temperature(temperature):
    z = _logits()
    ids, vals, tail = _store(*pack_topk(z, k=z.shape[1]))
    rebuilt = rebuild_log_probs(ids, vals, tail, z.shape[1], temperature)
    dense = torch.log_softmax(z / temperature, dim=1)
    # fp16 rounding of a log-prob v is at most |v| * 2**-11; at temperature T that error shrinks by 1/T,
    # and the renormalisation can at most double it.
    bound = 2 * (torch.log_softmax(z, 1).abs().max() * 2**-11) / temperature
    assert (rebuilt - dense).abs().max() <= bound + 1e-6
    assert torch.isinf(tail).all()


def test_topk_probabilities_and_tail_mass_exact_at_t1():
    z = _logits()
    k = 10
    ids, vals, tail = _store(*pack_topk(z, k))
    p = torch.softmax(z, 1)
    rebuilt = rebuild_log_probs(ids, vals, tail, z.shape[1], 1.0).exp()
    top_true = torch.gather(p, 1, ids.long())
    top_rebuilt = torch.gather(rebuilt, 1, ids.long())
    rel = (top_rebuilt - top_true).abs() / top_true
    max_abs_v = vals.float().abs().max()
    assert rel.max() <= math.exp(float(max_abs_v) * 2**-11) - 1 + 1e-3
    tail_true = 1 - top_true.sum(1)
    tail_rebuilt = 1 - top_rebuilt.sum(1)
    assert torch.allclose(tail_rebuilt, tail_true, atol=2e-3)
    # the ids are the true top-k, in order
    assert torch.equal(ids.long(), torch.topk(z, k, 1).indices)


def test_stored_values_are_shifted_log_probs():
    z = _logits(c=20)
    ids, vals, tail = pack_topk(z, 5)
    total = torch.logsumexp(torch.cat([vals, tail[:, None]], 1), 1)
    assert torch.allclose(total, torch.zeros_like(total), atol=1e-5)
    assert torch.allclose(topk_mass(vals) + tail.exp(), torch.ones(len(z)), atol=1e-5)


@pytest.mark.parametrize("temperature", [2.0, 4.0])
def test_uniform_tail_kl_is_small_and_shrinks_with_k(temperature):
    z = _logits(c=1000, scale=3.0)
    dense = torch.log_softmax(z / temperature, 1)
    kls = []
    for k in (5, 50, 500):
        rebuilt = rebuild_log_probs(*_store(*pack_topk(z, k)), 1000, temperature)
        kls.append(float((dense.exp() * (dense - rebuilt)).sum(1).mean()))
    assert kls[0] > kls[1] > kls[2] >= 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="top-k must be between"):
        pack_topk(torch.zeros(2, 5), 6)
    with pytest.raises(ValueError, match="temperature"):
        rebuild_log_probs(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1), torch.zeros(1), 3, 0.0)
