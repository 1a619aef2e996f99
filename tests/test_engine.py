"""Engine behaviour: stops, n, seeds, logprobs, aborts, prefix caching and request errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from loramux.engine import RequestError, SamplingParams
from tests.conftest import make_engine

PROMPT = "The history of the city begins with"


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    return make_engine(tiny_llama_dir)


def run(engine, rid, prompt, params, mix=()):
    """Step until the request ends; returns its outputs per index, in order."""
    engine.add_request(rid, prompt, params, mix)
    outs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outs.setdefault(out.index, []).append(out)
    return [outs[i] for i in sorted(outs)]


def test_stop_string_cuts_text_and_never_streams_it(engine):
    [full] = run(engine, "full", PROMPT, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    text = "".join(o.new_text for o in full)
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert len(stop.strip()) == 3
    [cut] = run(engine, "cut", PROMPT, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop=[stop]))
    streamed = "".join(o.new_text for o in cut)
    assert streamed == text[:text.index(stop)]
    assert cut[-1].finish_reason == "stop"


def test_max_tokens_and_stop_token_ids(engine):
    [out] = run(engine, "len", PROMPT, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    tokens = [t for o in out for t in o.new_token_ids]
    assert len(tokens) == 5 and out[-1].finish_reason == "length"
    [stopped] = run(engine, "tok", PROMPT, SamplingParams(max_tokens=5, temperature=0, stop_token_ids=[tokens[2]]))
    assert [t for o in stopped for t in o.new_token_ids] == tokens[:3]
    assert stopped[-1].finish_reason == "stop"


def test_n_completions_with_seed_are_reproducible_and_distinct(engine):
    params = SamplingParams(max_tokens=8, temperature=1.0, n=3, seed=11, ignore_eos=True)
    first = run(engine, "n1", PROMPT, params)
    second = run(engine, "n2", PROMPT, params)
    tokens = [[t for o in outs for t in o.new_token_ids] for outs in first]
    assert tokens == [[t for o in outs for t in o.new_token_ids] for outs in second]
    assert len({tuple(t) for t in tokens}) == 3


def test_logprobs_match_transformers(engine, tiny_llama_dir):
    [out] = run(engine, "lp", PROMPT, SamplingParams(max_tokens=4, temperature=0, logprobs=2, ignore_eos=True))
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    ids = engine.tokenizer.encode(PROMPT, add_special_tokens=False)
    for o in out:
        [lp] = o.logprobs
        with torch.no_grad():
            expected = torch.log_softmax(ref(torch.tensor([ids])).logits[0, -1], -1)
        assert abs(lp.logprob - float(expected[lp.token_id])) < 1e-4
        assert [t for t, _ in lp.top] == expected.topk(2).indices.tolist()
        ids.append(lp.token_id)


def test_abort_frees_every_block(engine):
    engine.add_request("a", PROMPT * 5, SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", PROMPT, SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.blocks.num_used > 0
    engine.abort("a")
    engine.abort("b")
    assert not engine.has_unfinished_requests()
    assert engine.blocks.num_free == engine.num_blocks


def test_prefix_cache_reuses_blocks_and_keeps_outputs(tiny_llama_dir):
    cached, uncached = make_engine(tiny_llama_dir), make_engine(tiny_llama_dir, prefix_caching=False)
    system = "You are a helpful assistant who answers briefly and politely. " * 3
    prompts = [system + q for q in ("What is two plus two?", "Name a colour.")]
    shared_blocks = len(cached.tokenizer.encode(system, add_special_tokens=False)) // 16
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    first = cached.generate(prompts[:1], params)
    assert cached.blocks.prefix_hit_tokens == 0
    second = cached.generate(prompts[1:], params)  # the first request is gone: its blocks are revived
    assert cached.blocks.prefix_hit_tokens >= 16 * (shared_blocks - 1)
    expected = uncached.generate(prompts, params)
    assert uncached.blocks.prefix_hit_tokens == 0
    assert [first[0][0].new_token_ids, second[0][0].new_token_ids] == [o[0].new_token_ids for o in expected]
    both = cached.generate(prompts, params)  # concurrent sharers of the same blocks
    assert [o[0].new_token_ids for o in both] == [o[0].new_token_ids for o in expected]
    assert cached.blocks.num_free == cached.num_blocks


@pytest.mark.parametrize("prompt, mix, param", [
    ("", (), "prompt"),
    ("word " * 5000, (), "prompt"),
    ([10**7], (), "prompt"),
    (PROMPT, ["no-such-adapter"], "adapters"),
])
def test_bad_requests_raise_and_leave_nothing_behind(engine, prompt, mix, param):
    with pytest.raises(RequestError) as err:
        engine.add_request("bad", prompt, SamplingParams(), mix)
    assert err.value.param == param
    assert not engine.has_unfinished_requests()
    engine.add_request("bad", PROMPT, SamplingParams(max_tokens=1))  # the id is free again
    engine.abort("bad")


@pytest.mark.parametrize("kwargs", [{"max_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"n": 0},
                                    {"logprobs": 50}, {"stop": [""]}])
def test_invalid_sampling_params(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
