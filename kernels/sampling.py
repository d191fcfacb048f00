"""Next-token choice: greedy, temperature, top-k, top-p, repetition penalty, seeds, logprobs.

Each sequence has its own torch.Generator, so a seeded request draws the same tokens whatever else
shares its batch. Logprobs are those of the model's raw distribution (before temperature and
filters), as vLLM reports them by default; under a grammar, of the masked distribution (the engine
masks the logits before they get here: kernels/structured.py). Shapes: B rows, V vocab.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kernels import native
from kernels.structured import Grammar

MAX_LOGPROBS = 20
# Logits divided by a temperature or repetition penalty smaller than these overflow to inf and the
# softmax gives NaN, failing the step for the whole batch: below MIN_TEMPERATURE decoding is greedy
# (vLLM's rule), a smaller penalty is refused.
MIN_TEMPERATURE = 1e-5
MIN_REPETITION_PENALTY = 0.01


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off; >1 discourages tokens already in prompt or output
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings; not included in the output text
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; n: the chosen token's logprob and the n most likely
    grammar: Grammar | None = None  # structured output: the text must match it (kernels/structured.py)

    def __post_init__(self):
        # before the ranges: NaN (a float field can hold it) fails every range check, which blames the range
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if 0 < self.temperature < MIN_TEMPERATURE:
            self.temperature = 0.0
        checks = [
            ("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1, "an integer >= 1"),
            ("temperature", 0 <= self.temperature <= 100, "in [0, 100]"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0"),
            ("repetition_penalty", MIN_REPETITION_PENALTY <= self.repetition_penalty <= 10,
             f"in [{MIN_REPETITION_PENALTY}, 10]"),
            ("seed", self.seed is None or isinstance(self.seed, int), "an integer"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "a list of non-empty strings"),
            ("stop_token_ids", all(type(i) is int and i >= 0 for i in self.stop_token_ids), "a list of integers >= 0"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, f"in [0, {MAX_LOGPROBS}]"),
            ("grammar", self.grammar is None or isinstance(self.grammar, Grammar), "a Grammar"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"{name} must be {want}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass
class Sample:
    token: int
    logprob: float
    top: list[tuple[int, float]] | None = None  # (token, logprob), most likely first


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return g


def _penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty: divide positive logits of seen tokens, multiply negative."""
    scores = logits[seen]
    logits[seen] = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask all but the top_k logits, then all but the smallest set whose probability reaches top_p."""
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > top_p  # mass before this token already reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator],
           seen: Sequence[Sequence[int] | torch.Tensor]) -> list[Sample]:
    """logits [B, V] fp32 -> one Sample per row. seen[i]: token ids of row i so far (for the penalty; made a
    tensor only for a row that has one). Logprobs are logit - logsumexp(row): no [B, V] log_softmax is
    written, only the rows' top ones are read where asked for."""
    # tokens: the greedy answer, replaced below where we sample; lse [B]: each row's logsumexp
    if (stats := native.row_stats(logits)) is not None:  # one C pass a row (sample() at 16 x 32000: 552 -> 262 us)
        best, tokens, lse = stats
    else:  # logsumexp on the max just found: one pass over [B, V] fewer than torch.logsumexp, and max() is 3x
        # faster than argmax() on CPU (16 x 32000: 0.5 ms a step saved, measured)
        best, tokens = logits.max(dim=-1)
        lse = best + (logits - best[:, None]).exp_().sum(-1).log_()
    drawn = False  # a row's token is not its max
    for i, p in enumerate(params):
        if p.greedy and p.repetition_penalty == 1:
            continue
        drawn = True
        row = logits[i].clone()
        if p.repetition_penalty != 1:
            row = _penalize(row, torch.as_tensor(seen[i], dtype=torch.long), p.repetition_penalty)
        if p.greedy:
            tokens[i] = row.argmax()
            continue
        row = _filter(row / p.temperature, p.top_k, p.top_p)
        tokens[i] = torch.multinomial(torch.softmax(row, dim=-1), 1, generator=generators[i])[0]
    # each row's token's logprob: at its max where no row was drawn otherwise (all greedy: no gather), and the tokens
    # as one list (a tensor element read a row took two ops each)
    chosen = ((logits.gather(1, tokens[:, None])[:, 0] if drawn else best) - lse).tolist()  # [B]
    out = []
    for i, (p, token) in enumerate(zip(params, tokens.tolist(), strict=True)):
        top = None
        if p.logprobs:
            values, ids = torch.topk(logits[i], p.logprobs)
            # tokens a grammar forbids (-inf) are not among the likely ones, however few remain
            ranked = zip(ids.tolist(), (values - lse[i]).tolist(), strict=True)
            top = [(t, v) for t, v in ranked if v > float("-inf")]
        out.append(Sample(token, chosen[i], top))
    return out
