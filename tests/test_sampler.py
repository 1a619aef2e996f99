"""The batched sampler: filters keep exactly the right mass, draws follow the distribution, seeds reproduce.

Device-agnostic: every test runs on the CPU, and on CUDA under `-m gpu`.
Empirical frequencies come from many independent draws made as one batch
(the same logits in every row, one output position per row); with N draws
a frequency's standard deviation is at most 0.5 / sqrt(N), and the
tolerance below is more than 4 of those.
"""

import math

import pytest
import torch

from loramux.engine.sampler import SamplingTensors, counter_uniforms, draw, filter_logits, sample
from loramux.engine.sequence import MAX_SEED, SamplingParams

from tests.conftest import DEVICES, make_engine

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 0.7, 1.5])
NUM_DRAWS = 40_000
TOLERANCE = 4.5 * 0.5 / NUM_DRAWS ** 0.5


def frequencies(params: SamplingParams, device: str, seed: int = 7) -> torch.Tensor:
    """Frequencies of NUM_DRAWS draws from LOGITS (one batch of rows at positions 0..N-1) -> [V] float64."""
    logits = LOGITS.to(device).expand(NUM_DRAWS, -1)
    t = SamplingTensors.build([params] * NUM_DRAWS, [seed] * NUM_DRAWS, list(range(NUM_DRAWS)), len(LOGITS),
                              torch.device(device))
    tokens = draw(logits, t).cpu()
    return torch.bincount(tokens, minlength=len(LOGITS)).double() / NUM_DRAWS


def reference(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """The renormalised target distribution, worked out in plain Python over the sorted probabilities."""
    values = [v / temperature for v in LOGITS.tolist()]
    keep = set(range(len(values)))
    if top_k:
        kth = sorted(values, reverse=True)[top_k - 1]
        keep = {i for i in keep if values[i] >= kth}

    def probs(kept):
        total = sum(math.exp(values[i]) for i in kept)
        return {i: math.exp(values[i]) / total for i in kept}

    if top_p < 1:
        p, mass, kept = probs(keep), 0.0, set()
        for i in sorted(keep, key=lambda i: -values[i]):
            if mass >= top_p:
                break
            kept.add(i)
            mass += p[i]
        keep = kept
    if min_p:
        p = probs(keep)
        keep = {i for i in keep if p[i] >= min_p * max(p.values())}
    p = probs(keep)
    return torch.tensor([p.get(i, 0.0) for i in range(len(values))], dtype=torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("settings", [
    dict(), dict(temperature=0.5), dict(temperature=2.0), dict(top_k=3), dict(top_p=0.8), dict(top_p=0.5),
    dict(min_p=0.2), dict(min_p=0.05, temperature=1.5), dict(top_k=5, top_p=0.9, min_p=0.1),
], ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "plain")
def test_draws_follow_the_renormalised_distribution(device, settings):
    expected = reference(**settings)
    got = frequencies(SamplingParams(**settings), device)
    assert set(got.nonzero().flatten().tolist()) <= set(expected.nonzero().flatten().tolist())
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_filters_keep_exactly_the_reference_support(device):
    cases = [dict(top_k=3), dict(top_p=0.8), dict(top_p=0.01), dict(min_p=0.2), dict(top_k=5, top_p=0.9, min_p=0.1),
             dict(temperature=0.3, top_p=0.9)]
    params = [SamplingParams(**c) for c in cases]
    t = SamplingTensors.build(params, [0] * len(cases), [0] * len(cases), len(LOGITS), torch.device(device))
    kept = torch.isfinite(filter_logits(LOGITS.to(device).expand(len(cases), -1), t)).cpu()
    for row, case in enumerate(cases):
        assert kept[row].tolist() == (reference(**case) > 0).tolist(), case


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_1_equals_greedy(device):
    logits = torch.randn(64, 5000, generator=torch.Generator().manual_seed(0)).to(device)
    params = [SamplingParams(temperature=0.8 + i / 64, top_k=1) for i in range(64)]
    tokens, _ = sample(logits, params, list(range(64)), [3] * 64)
    assert tokens == logits.argmax(-1).tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_and_sampled_rows_share_a_batch(device):
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(1)).to(device)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_p=0.9)] * 3
    tokens, _ = sample(logits, params, [11] * 6, [0] * 6)
    greedy = logits.argmax(-1).tolist()
    assert [tokens[i] for i in (0, 2, 4)] == [greedy[i] for i in (0, 2, 4)]
    assert [tokens[i] for i in (1, 3, 5)] != [greedy[i] for i in (1, 3, 5)]  # flat logits: argmax thrice is ~1e-7


@pytest.mark.parametrize("device", DEVICES)
def test_a_seeded_row_draws_the_same_token_in_any_batch(device):
    """The draw depends on (seed, position, logits) only: not on batch size, row order or neighbours."""
    g = torch.Generator().manual_seed(2)
    row = torch.randn(1000, generator=g)
    p = SamplingParams(temperature=1.0, top_p=0.95)
    alone = [sample(row[None].to(device), [p], [1234], [pos])[0][0] for pos in range(20)]
    for batch_size in (2, 7, 33):
        others = torch.randn(batch_size - 1, 1000, generator=g)
        at = batch_size // 2
        logits = torch.cat([others[:at], row[None], others[at:]]).to(device)
        params = [SamplingParams(temperature=0.7, top_k=50)] * batch_size
        params[at] = p
        together = []
        for pos in range(20):
            seeds, positions = list(range(batch_size)), [pos + 5] * batch_size
            seeds[at], positions[at] = 1234, pos
            together.append(sample(logits, params, seeds, positions)[0][at])
        assert together == alone
    other_seed = [sample(row[None].to(device), [p], [1235], [pos])[0][0] for pos in range(20)]
    assert other_seed != alone


@pytest.mark.parametrize("device", DEVICES)
def test_counter_uniforms_are_uniform_and_independent_across_seeds_and_positions(device):
    seeds = torch.tensor([0, 1, -1, 2**62, -(2**63), 5], device=device).repeat_interleave(20_000)  # -1: 2**64 - 1
    positions = torch.arange(20_000, device=device).repeat(6)
    u = counter_uniforms(seeds, positions).cpu()
    assert u.dtype == torch.float64 and 0 <= u.min() and u.max() < 1
    histogram = torch.histc(u, bins=20, min=0, max=1) / len(u)
    assert (histogram - 1 / 20).abs().max() < 0.003  # > 5 sigma at 120,000 values
    streams = u.view(6, -1) - 0.5
    corr = (streams @ streams.T) / (streams.norm(dim=1)[:, None] * streams.norm(dim=1)[None, :])
    assert (corr - torch.eye(6, dtype=torch.float64)).abs().max() < 0.04  # seeds: 5 sigma at 20,000 positions
    lagged = (streams[:, 1:] * streams[:, :-1]).sum() / (streams[:, 1:].norm() * streams[:, :-1].norm())
    assert abs(float(lagged)) < 0.02  # successive positions of one stream


@pytest.mark.gpu
@pytest.mark.parametrize("device", [d for d in DEVICES if d.id == "cuda"])
def test_cuda_uniforms_equal_cpu_uniforms_bit_for_bit(device):
    seeds = torch.tensor([0, 3, -7, 2**40 + 1, -(2**63)])
    positions = torch.tensor([0, 9, 100, 4000, 2**31 + 5])
    assert torch.equal(counter_uniforms(seeds.cuda(), positions.cuda()).cpu(), counter_uniforms(seeds, positions))


@pytest.mark.gpu
@pytest.mark.parametrize("device", [d for d in DEVICES if d.id == "cuda"])
def test_cuda_draw_never_waits_for_the_host(device):
    logits = torch.randn(32, 128256, device="cuda")
    params = [SamplingParams(temperature=1.0, top_k=40, top_p=0.9, min_p=0.05), SamplingParams(temperature=0)] * 16
    t = SamplingTensors.build(params, list(range(32)), [0] * 32, 128256, torch.device("cuda"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = draw(logits, t)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tokens.shape == (32,) and tokens.device.type == "cuda"


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_are_raw_log_softmax(device):
    logits = LOGITS.to(device).expand(3, -1)
    params = [SamplingParams(temperature=0.5, logprobs=3), SamplingParams(temperature=0),
              SamplingParams(temperature=0, logprobs=0)]
    tokens, logprobs = sample(logits, params, [0, 0, 0], [0, 0, 0])
    expected = torch.log_softmax(LOGITS.double(), -1)
    assert abs(logprobs[0].logprob - float(expected[tokens[0]])) < 1e-6
    assert [t for t, _ in logprobs[0].top] == [0, 7, 1]
    assert abs(logprobs[0].top[1][1] - float(expected[7])) < 1e-6
    assert logprobs[1] is None
    assert logprobs[2].token_id == 0 and logprobs[2].top == []


def test_seed_must_be_a_64_bit_unsigned_integer():
    SamplingParams(seed=0)
    SamplingParams(seed=MAX_SEED)
    for bad in (-1, 2**64, 2**70):
        with pytest.raises(ValueError, match="seed"):
            SamplingParams(seed=bad)


def test_engine_seeded_requests_reproduce_across_batches(tiny_llama_dir):
    """Same seed, same tokens: alone, beside other requests, and with n > 1 (completion i uses seed + i)."""
    engine = make_engine(tiny_llama_dir)
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=MAX_SEED, n=2, ignore_eos=True)
    alone = engine.generate([[5, 6, 7, 8]], p)[0]
    crowd = engine.generate([[9, 10], [5, 6, 7, 8], [11, 12, 13]], SamplingParams(
        max_tokens=12, temperature=1.0, top_p=0.95, seed=MAX_SEED, n=2, ignore_eos=True))[1]
    assert [o.new_token_ids for o in alone] == [o.new_token_ids for o in crowd]
    assert alone[0].new_token_ids != alone[1].new_token_ids  # seeds 2**64 - 1 and 0 (wrapped)
    assert not engine._detokenizers and not engine._sequences


def test_engine_refused_request_leaves_no_state(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir)
    with pytest.raises(ValueError):
        engine.add_request("r", [5, 6], SamplingParams(n=2), lora_mix=["no-such-adapter"])
    with pytest.raises(ValueError):
        engine.add_request("r", [engine.shape.vocab_size], SamplingParams(n=2))
    assert not engine._detokenizers and not engine._sequences and not engine.has_unfinished_requests()
