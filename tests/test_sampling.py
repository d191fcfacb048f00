"""Sampling: filters and penalty against transformers' logits processors; seeds; stops and streaming."""

import re

import pytest
import torch

from kernels.engine import Engine, Request
from kernels.sampling import SamplingParams, _filter, _penalize, make_generator, sample


def logits_row(seed=0, v=64):
    return torch.randn(v, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.6), (10, 0.9), (0, 0.05)])
def test_filters_match_transformers(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    row = logits_row(top_k)
    expected = row[None].clone()
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    assert torch.equal(torch.isinf(_filter(row, top_k, top_p)), torch.isinf(expected[0]))


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    row, seen = logits_row(1), torch.tensor([3, 7, 7, 20, 41])
    expected = RepetitionPenaltyLogitsProcessor(1.3)(seen[None], row[None].clone())[0]
    torch.testing.assert_close(_penalize(row.clone(), seen, 1.3), expected)


def test_sampling_follows_the_distribution():
    """20k seeded draws at temperature 0.7: frequencies within 1.5 points of softmax(logits / 0.7)."""
    row = logits_row(2, v=8) / 3
    p = SamplingParams(temperature=0.7)
    g = make_generator(0)
    draws = torch.tensor([sample(row[None], [p], [g], [torch.tensor([])])[0].token for _ in range(20000)])
    freq = torch.bincount(draws, minlength=8).float() / len(draws)
    assert (freq - torch.softmax(row / 0.7, -1)).abs().max() < 0.015


def test_same_seed_same_tokens_whatever_the_batch():
    rows = torch.stack([logits_row(i) for i in range(4)]) / 3
    p = SamplingParams(temperature=1.0, seed=7)
    alone = [sample(rows[2:3], [p], [make_generator(7)], [torch.tensor([])])[0].token for _ in range(1)]
    gens = [make_generator(i) for i in (1, 2, 7, 3)]
    batched = sample(rows[[0, 1, 2, 3]], [SamplingParams(temperature=1.0)] * 2 + [p, SamplingParams()], gens,
                     [torch.tensor([])] * 4)
    assert batched[2].token == alone[0]


def test_logprobs_are_the_raw_distribution():
    row = logits_row(3)
    s = sample(row[None], [SamplingParams(temperature=0, logprobs=3)], [make_generator(0)], [torch.tensor([])])[0]
    lp = torch.log_softmax(row, -1)
    assert s.token == int(row.argmax())
    assert s.logprob == pytest.approx(float(lp.max()), abs=1e-6)
    assert [t for t, _ in s.top] == torch.topk(lp, 3).indices.tolist()


@pytest.mark.parametrize("field, value", [("temperature", -1), ("top_p", 0), ("top_k", -2), ("max_tokens", 0),
                                          ("repetition_penalty", 0), ("logprobs", 21), ("stop", [""]),
                                          ("stop_token_ids", [2, -1]), ("stop_token_ids", [2.0])])
def test_bad_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "0.5", True])
@pytest.mark.parametrize("field", ["temperature", "top_p", "repetition_penalty"])
def test_non_finite_or_non_numbers_are_named_as_such(field, value):
    """Not "must be in [0, 100], got nan": that blames the range."""
    with pytest.raises(ValueError, match=rf"^{field} must be a finite number, got {re.escape(repr(value))}$"):
        SamplingParams(**{field: value})


# -- through the engine, with a real tokenizer -----------------------------------------------------
@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine.from_dir(tiny_model)


def run(engine, prompt, params, rid="r"):
    engine.add_request(Request(rid, engine.tokenizer.encode(prompt), params))
    events = []
    while engine.has_unfinished():
        events += engine.step()
    return events


def test_seeded_sampling_is_reproducible(engine):
    p = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=123, ignore_eos=True)
    a = [e.token for e in run(engine, "The router", p)]
    b = [e.token for e in run(engine, "The router", p)]
    other_seed = SamplingParams(max_tokens=20, temperature=1.0, seed=124, ignore_eos=True)
    c = [e.token for e in run(engine, "The router", other_seed)]
    assert a == b and a != c


def test_stop_string_cuts_text_and_streams_consistently(engine):
    full = run(engine, "Experts", SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    text = "".join(e.text for e in full)
    assert text == engine.tokenizer.decode([e.token for e in full])
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), f"pick a visible stop string from {text!r}"
    events = run(engine, "Experts", SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop]))
    assert "".join(e.text for e in events) == text[: text.index(stop)]
    assert (events[-1].finish_reason, events[-1].stop_reason) == ("stop", stop)
    assert all(e.finish_reason is None for e in events[:-1])


def test_stop_token_and_length(engine):
    full = run(engine, "Tokens", SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    assert len(full) == 10 and full[-1].finish_reason == "length"
    stop_tok = full[4].token
    events = run(engine, "Tokens",
                 SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, stop_token_ids=[stop_tok]))
    first = next(i for i, e in enumerate(full) if e.token == stop_tok)
    assert len(events) == first + 1 and (events[-1].finish_reason, events[-1].stop_reason) == ("stop", stop_tok)


def test_tiny_temperature_is_greedy_and_tiny_penalty_refused():
    """Logits divided by these would overflow to NaN and fail the whole batch's step."""
    assert SamplingParams(temperature=1e-300).greedy
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=1e-300)
    logits = torch.randn(1, 50)
    [s] = sample(logits, [SamplingParams(temperature=1e-300)], [make_generator(0)], [torch.tensor([1])])
    assert s.token == int(logits.argmax())
