import torch

from loramux.engine.sampler import filter_logits, sample
from loramux.engine.sequence import SamplingParams

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def draw(params: SamplingParams, n: int = 400, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [sample(LOGITS[None], [params], [gen])[0][0] for _ in range(n)]


def test_greedy_takes_the_argmax():
    assert set(draw(SamplingParams(temperature=0), n=5)) == {0}


def test_top_k_top_p_min_p_restrict_the_support():
    assert set(draw(SamplingParams(temperature=1.0, top_k=2))) == {0, 1}
    probs = LOGITS.softmax(-1)  # 0.53, 0.19, 0.12, ... : top_p 0.7 keeps the first two
    assert probs[:1].sum() < 0.7 <= probs[:2].sum()
    assert set(draw(SamplingParams(temperature=1.0, top_p=0.7))) == {0, 1}
    assert set(draw(SamplingParams(temperature=1.0, min_p=0.3))) == {0, 1}  # p >= 0.3 * 0.53


def test_sampling_follows_the_distribution():
    samples = draw(SamplingParams(temperature=1.0), n=4000)
    freq = torch.bincount(torch.tensor(samples), minlength=6).float() / 4000
    torch.testing.assert_close(freq, LOGITS.softmax(-1), atol=0.03, rtol=0)


def test_temperature_sharpens():
    cold = draw(SamplingParams(temperature=0.2), n=400)
    assert cold.count(0) > 380


def test_same_seed_same_tokens_other_seed_differs():
    p = SamplingParams(temperature=1.0)
    assert draw(p, 50, seed=3) == draw(p, 50, seed=3)
    assert draw(p, 50, seed=3) != draw(p, 50, seed=4)


def test_logprobs_are_raw_log_softmax():
    gen = torch.Generator().manual_seed(0)
    tokens, logprobs = sample(LOGITS[None], [SamplingParams(temperature=0.5, logprobs=3)], [gen])
    expected = torch.log_softmax(LOGITS, -1)
    assert abs(logprobs[0].logprob - float(expected[tokens[0]])) < 1e-6
    assert [t for t, _ in logprobs[0].top] == [0, 1, 2]
    assert abs(logprobs[0].top[1][1] - float(expected[1])) < 1e-6


def test_filter_keeps_top_token_even_for_tiny_top_p():
    kept = torch.isfinite(filter_logits(LOGITS, SamplingParams(top_p=0.01)))
    assert kept.tolist() == [True, False, False, False, False, False]
