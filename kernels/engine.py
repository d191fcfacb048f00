"""The single-process engine: continuous batching over one Transformer. The oracle for the pipeline.

Every step runs one forward pass over a flat batch of new tokens from many sequences: decodes (one
token each) first, then prompt chunks of sequences being prefilled, within a token budget.
Sequences join when there is room and leave the moment they finish, freeing their KV blocks.

KV memory is allocated on demand (`kv_allocation: on_demand`, the default): a sequence is admitted when
the blocks its prompt needs are free (plus a watermark of 1% of the cache while others run), and gets a
block when it crosses into one. When none is free, the most recently admitted running sequence is
preempted: its blocks are released, it goes back to the head of the queue, and when it runs again it
recomputes its cache from its tokens (prompt + generated so far); nothing already streamed is sent again.
`kv_allocation: reserve` reserves each sequence's worst case (prompt + max_tokens, or the window) at
admission instead: never a preemption, fewer sequences at once. A request that does not fit waits (FIFO).

Prefix caching (`enable_prefix_caching`, on by default; kernels/blocks.py): full blocks of computed tokens
are named by their tokens and everything before them, and a sequence whose prompt starts with named blocks
takes them instead of computing them (at least its last prompt token is computed, for its logits). Not
for sliding-window models, whose rolling buffer overwrites its blocks.

Several decode steps a call (`decode_steps`, 8 by default; CPU, where a step runs in one C call): while every
running sequence decodes greedily and no request waits, up to that many steps run in one executor call, each token
chosen in C as sampling's greedy path chooses it (the same tokens and logprobs), and the step's Python (~0.15 ms:
scheduling, inputs, sampling, events) is paid once for them; a sequence that finishes mid-burst drops the rest. A
burst takes only as many steps as fit in `decode_burst_ms` (20) at the last step's pace, so a request arriving
mid-burst waits about that long at most, and a model whose steps are slower than that runs a step a call. Which
steps burst depends on timing; the tokens do not.

An executor that loses KV state (a restarted attention actor) raises CacheLost: every running
sequence then recomputes its cache from its tokens (prompt + generated so far) in the next steps, in
its own blocks, and generation goes on where it was; nothing already streamed is sent again.
"""

from __future__ import annotations

import itertools
import re
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Protocol

import torch

from kernels.args import ModelArgs
from kernels.blocks import BlockPool, block_names
from kernels.build import DTYPE_CHOICES, DTYPES, QUANT_BITS, Holds, build_role
from kernels.cache import KVCache, StepSeq, blocks_for, longs
from kernels.checkpoint import Checkpoint
from kernels.fused_moe import KERNELS
from kernels.model import Step, Transformer
from kernels.sampling import SamplingParams, make_generator, sample
from kernels.structured import Grammar, Grammars, GrammarState, constrain
from kernels.tokenizer import IncrementalDetokenizer, Tokenizer

DEVICE = re.compile(r"cpu|cuda(:\d+)?")


@dataclass
class EngineConfig:
    max_num_seqs: int = 64  # sequences in one step at most
    max_num_batched_tokens: int = 2048  # new tokens in one step at most; longer prompts prefill in chunks
    kv_cache_tokens: int = 65536  # KV-cache capacity, all sequences together, in tokens
    block_size: int = 16  # KV-cache block, in tokens
    # weights and activations: auto (the checkpoint's precision where this CPU computes it fast: bf16 for a bf16
    # checkpoint with AVX-512 BF16 / AMX, else fp32 activations with its bf16 weights kept; kernels.build.model_dtype,
    # weight_formats) | float32 | bfloat16 | float16
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"  # the KV cache: auto (= the weights') | float32 | bfloat16 | float16
    max_queued_requests: int = 256  # requests waiting for a batch slot at most; more -> QueueFull (HTTP 429)
    # expert weights: none | int8 | int4 (weight-only) | w8a8 (int8 weights and activations, CPU only) | bf16 (bf16
    # weights, activations in dtype: for fp32 models; kernels/quant.py)
    expert_quant: str = "none"
    weight_quant: str = "none"  # attention projections and LM head: as expert_quant (kernels.quant.quantize_dense)
    kv_allocation: str = "on_demand"  # on_demand (blocks as sequences grow; preempt when out) | reserve (worst case)
    enable_prefix_caching: bool = True  # reuse computed full blocks of equal prefixes (not with a sliding window)
    # weights, KV cache and activations: cpu | cuda | cuda:N. Only the spelling is checked here; whether
    # this process has that GPU is checked where tensors are made (kernels.build): a config loads anywhere
    device: str = "cpu"
    moe_kernel: str = "reference"  # the MoE experts stage: reference (kernels/moe.py) | triton (kernels/fused_moe.py)
    # greedy decode steps one call may take (CPU, where a step runs in one C call): > 1 amortizes the engine's Python
    # a step over that many tokens while every running sequence decodes greedily and none waits (Engine.step)...
    decode_steps: int = 8
    # ...and only as many as take this long at the last step's pace: a request arriving mid-burst waits at most
    # about this long, and tokens stream at least this often (a model whose step takes longer runs a step a call)
    decode_burst_ms: float = 20.0

    def __post_init__(self):
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {list(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in DTYPES:
            raise ValueError(f"kv_cache_dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.expert_quant not in QUANT_BITS:
            raise ValueError(f"expert_quant must be one of {sorted(QUANT_BITS)}, got {self.expert_quant!r}")
        if self.weight_quant not in QUANT_BITS:
            raise ValueError(f"weight_quant must be one of {sorted(QUANT_BITS)}, got {self.weight_quant!r}")
        if not isinstance(self.device, str) or not DEVICE.fullmatch(self.device):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.kv_allocation not in ("on_demand", "reserve"):
            raise ValueError(f"kv_allocation must be 'on_demand' or 'reserve', got {self.kv_allocation!r}")
        if "w8a8" in (self.expert_quant, self.weight_quant) and self.device != "cpu":
            raise ValueError(f"w8a8 runs on CPU (int8 activations in moeray's CPU kernel), not on {self.device}: "
                             f"use int8 (weight-only) there")
        if self.moe_kernel not in KERNELS:
            raise ValueError(f"moe_kernel must be one of {list(KERNELS)}, got {self.moe_kernel!r}")
        if self.moe_kernel != "reference" and self.expert_quant != "none":
            raise ValueError(f"moe_kernel {self.moe_kernel!r} runs unquantized experts only (there is no fused "
                             f"dequantizing kernel yet): use expert_quant 'none' or moe_kernel 'reference'")
        for name in ("max_num_seqs", "max_num_batched_tokens", "kv_cache_tokens", "block_size", "max_queued_requests",
                     "decode_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.decode_burst_ms >= 0:
            raise ValueError(f"decode_burst_ms must be >= 0, got {self.decode_burst_ms}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs "
                             "(every running sequence decodes each step)")

    @property
    def num_blocks(self) -> int:
        return self.kv_cache_tokens // self.block_size

    def kv_dtype(self, weights: torch.dtype) -> torch.dtype:
        """The KV cache's dtype for a model whose weights are `weights`: kv_cache_dtype, or `weights` under
        auto. bf16 / fp16 halve an fp32 model's cache (twice the tokens in the same memory)."""
        return weights if self.kv_cache_dtype == "auto" else DTYPES[self.kv_cache_dtype]


class CacheLost(RuntimeError):
    """Raised by an executor whose KV cache (or part of it) is gone, with the step undone: the engine
    recomputes every running sequence's cache, then goes on."""


class QueueFull(RuntimeError):
    """The waiting queue is full: retry later (HTTP 429, gRPC RESOURCE_EXHAUSTED)."""


class RequestIdInUse(ValueError):
    """A queued or running request already has this id (HTTP 409, gRPC ALREADY_EXISTS)."""


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class TokenEvent:
    """One sampled token of one request, as the engine streams it."""

    request_id: str
    token: int
    logprob: float
    top_logprobs: list[tuple[int, float]] | None
    text: str  # new text; may lag the tokens while it could still be the start of a stop string
    finish_reason: str | None = None  # None while running; "stop" | "length"
    stop_reason: int | str | None = None  # the EOS / stop token id or the stop string that ended it


@dataclass
class Completion:
    """A finished request, gathered from its TokenEvents."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def add(self, ev: TokenEvent) -> None:
        self.token_ids.append(ev.token)
        self.logprobs.append(ev.logprob)
        self.top_logprobs.append(ev.top_logprobs)
        self.text += ev.text
        self.finish_reason, self.stop_reason = ev.finish_reason, ev.stop_reason


def params_per_prompt(params: SamplingParams | list[SamplingParams] | None, n: int) -> list[SamplingParams]:
    """The SamplingParams of each of `n` prompts, for generate(prompts, params): one for all (None: the
    defaults), or a list with one per prompt. A list of another length is a ValueError: a shorter one would
    otherwise drop prompts without a word."""
    if not isinstance(params, list):
        return [params or SamplingParams()] * n
    if len(params) != n:
        raise ValueError(f"params: {len(params)} SamplingParams for {n} prompts; give one per prompt, or one for all")
    return params


class Sequence:
    def __init__(self, req: Request, eos_id: int, tokenizer: Tokenizer | None, max_len: int):
        self.req, self.params = req, req.params
        self.tokens = list(req.prompt_ids)  # prompt + generated
        self.num_prompt = len(req.prompt_ids)
        self.max_len = min(max_len, self.num_prompt + self.params.max_tokens)
        self.num_cached = 0  # tokens whose K/V are in the cache
        self.block_table: list[int] = []
        self.generator = make_generator(self.params.seed)
        self.detok = IncrementalDetokenizer(tokenizer, req.prompt_ids) if tokenizer else None
        self.grammar: GrammarState | None = None  # structured output: set by Engine.add_request
        # under a grammar, EOS is sampled only where the output is complete, and it ends it (even with ignore_eos)
        self.stops = set(self.params.stop_token_ids) | (
            set() if self.params.ignore_eos and not self.params.grammar else {eos_id})
        self.text, self.emitted = "", 0
        self.names: list[bytes] = []  # prefix-cache names of its first full blocks of tokens (kernels/blocks.py)
        self.named = 0  # its first blocks known to the pool by those names (computed, or taken from the cache)

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.num_cached

    def append(self, token: int, logprob: float, top) -> TokenEvent:
        self.tokens.append(token)
        finish: str | None = None
        reason: int | str | None = None
        if token in self.stops:
            finish, reason = "stop", token
        elif self.detok:
            self.text += self.detok.push(token)
            finish, reason = self._match_stop_string()
        if finish is None and len(self.tokens) >= self.max_len:
            finish = "length"
        if finish and self.detok and reason is None:  # bytes of an unfinished character, if the stream ends mid-way
            self.text += self.detok.flush()
        end = len(self.text) if finish else len(self.text) - self._holdback()
        delta, self.emitted = self.text[self.emitted : end], max(self.emitted, end)
        return TokenEvent(self.req.request_id, token, logprob, top, delta, finish, reason)

    def _match_stop_string(self) -> tuple[str | None, str | None]:
        for s in self.params.stop:
            i = self.text.find(s, max(0, self.emitted - len(s)))
            if i >= 0:
                self.text = self.text[:i]
                return "stop", s
        return None, None

    def _holdback(self) -> int:
        """Length of the longest tail of the text that could still grow into a stop string."""
        return max((n for s in self.params.stop for n in range(len(s) - 1, 0, -1) if self.text.endswith(s[:n])),
                   default=0)


class Scheduler:
    """Which sequences run in the next step, and how many of their tokens. Owns the KV block tables."""

    def __init__(self, config: EngineConfig, window: int | None):
        self.config, self.window = config, window
        self.pool = BlockPool(config.num_blocks)
        self.caching = config.enable_prefix_caching and window is None
        self.on_demand = config.kv_allocation == "on_demand"
        self.watermark = max(1, config.num_blocks // 100)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.preemptions = 0
        self.cache_queries = self.cache_hits = 0  # prompt tokens looked up in the prefix cache, and found

    def blocks_needed(self, seq: Sequence) -> int:
        """Blocks for the sequence's worst case (prompt + max_tokens, or its window)."""
        return blocks_for(seq.max_len, self.config.block_size, self.window)

    def _blocks_for(self, seq: Sequence, tokens: int) -> int:
        """More blocks `seq` needs to hold `tokens` tokens (reserve: it has its worst case already)."""
        return blocks_for(tokens, self.config.block_size, self.window) - len(seq.block_table) if self.on_demand else 0

    def schedule(self) -> list[tuple[Sequence, int]]:
        budget, batch = self.config.max_num_batched_tokens, list[tuple[Sequence, int]]()
        for seq in sorted(self.running, key=lambda s: s.pending > 1):  # decodes first, then prompt chunks
            if seq not in self.running:  # preempted for a sequence before it
                continue
            n = min(seq.pending, budget)
            if n and self._grow(seq, seq.num_cached + n, batch):
                batch.append((seq, n))
                budget -= n
        while self.waiting and budget and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not self._admit(seq, budget):
                break  # FIFO: the head waits for memory rather than being overtaken
            self.waiting.popleft()
            self.running.append(seq)
            n = min(seq.pending, budget)
            seq.block_table += self.pool.allocate(self._blocks_for(seq, seq.num_cached + n))
            batch.append((seq, n))
            budget -= n
        return batch

    def _admit(self, seq: Sequence, budget: int) -> bool:
        """Whether `seq` can start now; if so, it holds the cached blocks of its prompt's prefix (num_cached
        after them) and, reserving, its worst case."""
        bs = self.config.block_size
        hits: list[int] = []
        if self.caching:  # its last token is computed whatever is cached: its logits are needed
            seq.names = block_names(seq.tokens[: len(seq.tokens) - 1], bs, seq.names)
            hits = self.pool.lookup(seq.names)
        cached = len(hits) * bs
        if self.on_demand:  # its prompt's blocks, and room to grow while others run
            need = blocks_for(len(seq.tokens), bs, self.window) - len(hits)
            need += self.watermark if self.running else 0
        else:
            need = self.blocks_needed(seq) - len(hits)
        if need > self.pool.num_free - self.pool.unreferenced(hits):
            return False
        self.pool.take(hits)
        seq.block_table, seq.num_cached, seq.named = hits, cached, len(hits)
        if not self.on_demand:
            seq.block_table = hits + self.pool.allocate(self.blocks_needed(seq) - len(hits))
        self.cache_queries += len(seq.tokens)
        self.cache_hits += cached
        return True

    def _grow(self, seq: Sequence, tokens: int, batch: list[tuple[Sequence, int]]) -> bool:
        """Gives `seq` the blocks to hold `tokens` tokens, preempting the most recently admitted sequences
        while none are free; False if `seq` itself was preempted."""
        need = self._blocks_for(seq, tokens)
        while need > self.pool.num_free:
            victim = self.running[-1]
            self.preempt(victim)
            batch[:] = [(s, n) for s, n in batch if s is not victim]
            if victim is seq:
                return False
        seq.block_table += self.pool.allocate(max(need, 0))
        return True

    def extend(self, batch: list[tuple[Sequence, int]], steps: int) -> bool:
        """Blocks for `steps` new tokens of each sequence of a decode batch, where the pool has them all without
        preempting; False, nothing taken, otherwise."""
        needs = [max(self._blocks_for(seq, seq.num_cached + steps), 0) for seq, _ in batch]
        if sum(needs) > self.pool.num_free:
            return False
        for (seq, _), need in zip(batch, needs, strict=True):
            seq.block_table += self.pool.allocate(need)
        return True

    def preempt(self, seq: Sequence) -> None:
        """Back to the head of the queue with no blocks: it recomputes its cache when it runs again."""
        self.preemptions += 1
        self.running.remove(seq)
        self.pool.free(seq.block_table)
        seq.block_table, seq.num_cached, seq.named = [], 0, 0
        self.waiting.appendleft(seq)

    def computed(self, batch: list[tuple[Sequence, int]]) -> None:
        """The step ran: its tokens are cached, and blocks it filled are named for others to share."""
        for seq, n in batch:
            seq.num_cached += n
            full = seq.num_cached // self.config.block_size
            if self.caching and full > seq.named:
                seq.names = block_names(seq.tokens[: seq.num_cached], self.config.block_size, seq.names)
                for i in range(seq.named, full):
                    self.pool.name(seq.block_table[i], seq.names[i])
                seq.named = full

    def recompute(self) -> None:
        """The cache's contents are lost: every running sequence writes its cache again from its tokens (it keeps
        its blocks), and nothing cached is shared any more."""
        self.pool.forget()
        for seq in self.running:
            seq.num_cached = seq.named = 0

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self.pool.free(seq.block_table)
            seq.block_table = []
        elif seq in self.waiting:
            self.waiting.remove(seq)


class Executor(Protocol):
    """Runs the model on a step's flat batch: here in one process, or spread over actors (the pipeline)."""

    def forward(self, tokens: torch.Tensor, seqs: list[StepSeq], logits_index: torch.Tensor) -> torch.Tensor:
        """tokens [T] (the new tokens of `seqs`, in order) -> fp32 logits [S, V] of the rows logits_index [S].
        tokens and logits_index are CPU tensors; the logits may be on any device."""
        ...


class LocalExecutor:
    """The whole model and its KV cache in this process, on the model's device: the step's CPU tensors
    go there; the logits stay there (the engine samples on CPU)."""

    def __init__(self, model: Transformer, config: EngineConfig):
        a, self.model = model.args, model
        self.device = model.device
        self.cache = KVCache(a.n_layers, config.num_blocks, config.block_size, a.n_kv_heads, a.head_dim,
                             dtype=config.kv_dtype(model.dtype), device=self.device)

    def forward(self, tokens, seqs, logits_index):
        step = Step.begin(seqs, self.model.args, self.cache)
        return self.model(tokens.to(self.device), step, logits_index.to(self.device))

    def decode_steps(self, tokens: torch.Tensor, seqs: list[StepSeq],
                     steps: int) -> tuple[list[list[int]], list[list[float]]] | None:
        """`steps` greedy decode steps of `seqs` (each with one new token, tokens [B]) in one call where the model
        runs a step in one (Transformer.decode_steps): each step's chosen tokens and their logprobs [steps][B];
        None where it does not (nothing computed)."""
        step = Step.of_rows(seqs, self.model.args, self.cache, steps)
        return None if step is None else self.model.decode_steps(tokens, step, steps)


def load_tokenizer(path: str | Path) -> Tokenizer | None:
    """The checkpoint's tokenizer, or None: a model without one still runs on token ids."""
    try:
        return Tokenizer.from_dir(path)
    except FileNotFoundError:
        return None


class Engine:
    def __init__(self, executor: Executor, args: ModelArgs, tokenizer: Tokenizer | None = None,
                 config: EngineConfig | None = None):
        self.executor, self.args, self.tokenizer = executor, args, tokenizer
        self.config = config or EngineConfig()
        self.scheduler = Scheduler(self.config, args.sliding_window)
        self.seqs: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self.recomputes = 0  # times the executor lost KV state and running sequences recomputed theirs
        self._step_s = 0.0  # the last step's seconds per token a sequence got in it: how many steps a burst takes
        # the executor's decode_steps (LocalExecutor's): None where it has none, or once it ran no burst (its model
        # does not run a step in one call)
        self._bursts: Callable[..., tuple[list[list[int]], list[list[float]]] | None] | None = getattr(
            executor, "decode_steps", None)
        self.grammars = Grammars(tokenizer, args.vocab_size) if tokenizer else None

    @classmethod
    def from_dir(cls, path: str | Path, config: EngineConfig | None = None,
                 progress: Callable[[int, int], None] | None = None) -> Engine:
        """The single-process engine on a checkpoint directory (HF or Mistral format), the whole model built
        as config says (device, dtype, expert_quant, weight_quant, moe_kernel: kernels/build.py)."""
        config = config or EngineConfig()
        model = build_role(Checkpoint.open(path), config, Holds(whole=True), progress).model
        return cls(LocalExecutor(model, config), model.args, load_tokenizer(path), config)

    # -- requests ------------------------------------------------------------------------------
    def grammar_state(self, grammar: Grammar) -> GrammarState:
        """A fresh GrammarState of a request's grammar (structured output). Milliseconds a schema, ~0.1 s the
        first time at a 32000-piece vocabulary: a caller that drives the engine from a step thread builds it on
        another thread and hands it to add_request (cluster/loop.py). ValueError if it cannot be built."""
        if self.grammars is None:
            raise ValueError("structured output needs a tokenizer; this model has none")
        return self.grammars.state(grammar)

    def add_request(self, req: Request, grammar: GrammarState | None = None) -> None:
        """Queues a request; ValueError (naming the problem) if it can never run. `grammar`: the state of
        req.params.grammar, if already built (grammar_state); built here otherwise."""
        if req.request_id in self.seqs:
            raise RequestIdInUse(f"request id {req.request_id!r} is already in use")
        if not req.prompt_ids:
            raise ValueError("prompt is empty")
        if not all(isinstance(t, int) and 0 <= t < self.args.vocab_size for t in req.prompt_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {self.args.vocab_size})")
        total = len(req.prompt_ids) + req.params.max_tokens
        if total > self.args.max_seq_len:
            raise ValueError(f"prompt ({len(req.prompt_ids)} tokens) + max_tokens ({req.params.max_tokens}) "
                             f"= {total} exceeds the model's context of {self.args.max_seq_len} tokens")
        if req.params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model has none")
        seq = Sequence(req, self.args.eos_id, self.tokenizer, self.args.max_seq_len)
        if req.params.grammar:
            seq.grammar = grammar or self.grammar_state(req.params.grammar)
        if self.scheduler.blocks_needed(seq) > self.config.num_blocks:
            raise ValueError(f"request needs {total} tokens of KV cache; the cache holds {self.config.kv_cache_tokens}")
        if len(self.scheduler.waiting) >= self.config.max_queued_requests:
            raise QueueFull(f"{len(self.scheduler.waiting)} requests are already waiting; retry later")
        self.seqs[req.request_id] = seq
        self.scheduler.waiting.append(seq)

    def abort(self, request_id: str) -> None:
        """Drops a request (queued or running) and frees its KV blocks at once. Unknown ids are ignored."""
        seq = self.seqs.pop(request_id, None)
        if seq:
            self.scheduler.finish(seq)

    def has_unfinished(self) -> bool:
        return bool(self.seqs)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def kv_cache_usage(self) -> float:
        pool = self.scheduler.pool
        return 1 - pool.num_free / pool.num_blocks

    @property
    def counters(self) -> dict[str, int]:
        """Since start: sequences preempted, and prompt tokens looked up in the prefix cache and found there."""
        s = self.scheduler
        return {"num_preemptions": s.preemptions, "prefix_cache_queries": s.cache_queries,
                "prefix_cache_hits": s.cache_hits}

    # -- the step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        start = perf_counter()
        if (steps := self._decode_steps(batch)) == 1 or (events := self._step_many(batch, steps)) is None:
            events, steps = self._step_one(batch), 1
        self._step_s = (perf_counter() - start) / steps
        return events

    def _step_one(self, batch: list[tuple[Sequence, int]]) -> list[TokenEvent]:
        """One step of `batch` (its decodes and prompt chunks): the executor's forward pass, then sampling."""
        tokens = longs(t for seq, n in batch for t in seq.tokens[seq.num_cached : seq.num_cached + n])  # [T]
        seqs = [StepSeq(s.block_table, s.num_cached, n) for s, n in batch]
        # the flat index of the last token of each sequence whose prompt is now fully cached: those sample (lists,
        # not tensor ops: each of those took ~10 us in a decode step, slowed by the weights just streamed)
        done = [seq.num_cached + n == len(seq.tokens) for seq, n in batch]
        ends = [end - 1 for end, d in zip(itertools.accumulate(n for _, n in batch), done, strict=True) if d]
        sampling = [seq for (seq, _), d in zip(batch, done, strict=True) if d]
        try:
            logits = self.executor.forward(tokens, seqs, longs(ends))  # [S, V]
        except CacheLost:
            self.recomputes += 1
            self.scheduler.recompute()
            return []
        self.scheduler.computed(batch)
        # sampling runs on CPU: its per-sequence generators are CPU ones, so a seed draws the same tokens
        # on every device (the cost: [S, V] fp32 copied to the host once per step)
        logits = logits.cpu()
        constrain(logits, [s.grammar for s in sampling])
        samples = sample(logits, [s.params for s in sampling], [s.generator for s in sampling],
                         [s.tokens for s in sampling])
        events = []
        for seq, smp in zip(sampling, samples, strict=True):
            if seq.grammar:
                seq.grammar.accept(smp.token)
            ev = seq.append(smp.token, smp.logprob, smp.top)
            events.append(ev)
            if ev.finish_reason:
                self.seqs.pop(seq.req.request_id)
                self.scheduler.finish(seq)
        return events

    def _decode_steps(self, batch: list[tuple[Sequence, int]]) -> int:
        """How many decode steps `batch` may take in one call: engine.decode_steps where every sequence decodes
        (one new token) greedily, unconstrained, unpenalized, with no top logprobs asked for, and no request waits;
        at most as many as the last step's pace fits in decode_burst_ms, and the tokens any of them has left. Else 1."""
        if self._bursts is None or self.scheduler.waiting:
            return 1
        steps, pace = self.config.decode_steps, self._step_s * 1e3
        if pace:
            steps = min(steps, int(self.config.decode_burst_ms / pace))
        if steps <= 1:
            return 1
        for seq, n in batch:
            p = seq.params
            if n != 1 or seq.pending != 1 or seq.grammar or not p.greedy or p.repetition_penalty != 1 or p.logprobs:
                return 1
            steps = min(steps, seq.max_len - len(seq.tokens))
        return steps

    def _step_many(self, batch: list[tuple[Sequence, int]], steps: int) -> list[TokenEvent] | None:
        """`steps` greedy decode steps of `batch` in one executor call (LocalExecutor.decode_steps): the tokens, the
        logprobs and the events of as many single steps, a sequence's tokens after its finish dropped (their keys
        sit past its end); None, nothing run, where the executor does not take them or the pool lacks the blocks."""
        if self._bursts is None or not self.scheduler.extend(batch, steps):
            return None
        seqs = [StepSeq(s.block_table, s.num_cached, 1) for s, _ in batch]
        out = self._bursts(longs(s.tokens[-1] for s, _ in batch), seqs, steps)
        if out is None:  # not this model (its blocks taken stay its sequences', for the tokens to come)
            self._bursts = None
            return None
        chosen, logprobs = out
        events = []
        for b, (seq, _) in enumerate(batch):
            for s in range(steps):
                events.append(ev := seq.append(chosen[s][b], logprobs[s][b], None))
                if ev.finish_reason:
                    break
            self.scheduler.computed([(seq, s + 1)])
            if ev.finish_reason:
                self.seqs.pop(seq.req.request_id)
                self.scheduler.finish(seq)
        return events

    # -- convenience -----------------------------------------------------------------------------
    def generate(self, prompts: Iterable[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[Completion]:
        """Runs prompts to completion, all in one continuous batch; results in prompt order."""
        prompts = list(prompts)
        results = {}
        for p, sp in zip(prompts, params_per_prompt(params, len(prompts)), strict=True):
            rid = f"gen-{next(self._ids)}"
            self.add_request(Request(rid, list(p), sp))
            results[rid] = Completion(rid)
        while self.has_unfinished():
            for ev in self.step():
                if ev.request_id in results:
                    results[ev.request_id].add(ev)
        return list(results.values())
