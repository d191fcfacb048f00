"""kernels/native.py: moeray's fp32 CPU linear (kernels/csrc/linear.c) against float64, its row and thread
independence, where it runs and where torch's runs instead, and the fp32 engine on it and without it.
(The int8 kernel: tests/test_quant.py.)"""

import platform
import shutil

import pytest
import torch
import torch.nn.functional as F
from test_engine import hf_greedy, hf_model, prompts

import kernels.native
from kernels import native
from kernels.build import Holds, build_role
from kernels.checkpoint import Checkpoint
from kernels.engine import Engine, EngineConfig
from kernels.packing import linear
from kernels.sampling import SamplingParams


def bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fp32 summation error of x @ w^T over I terms: I * eps * sum_k |x_k w_k| (a loose, sure bound)."""
    return x.shape[1] * torch.finfo(torch.float32).eps * (x.double().abs() @ w.double().abs().T)


@pytest.mark.parametrize("O,I", [(1, 16), (5, 64), (96, 528), (130, 256)])
def test_fp32_kernel_within_summation_error_at_every_row_count(O, I):
    """1 to MAX_ROWS rows (tiles of up to 6 rows, 4 outputs: O not a multiple of 4 ends in a part tile), each
    result within fp32 summation error of float64, and each row the same bits alone as in any batch."""
    g = torch.Generator().manual_seed(O * I)
    w, xs = torch.randn(O, I, generator=g), torch.randn(native.MAX_ROWS, I, generator=g)
    alone = torch.cat([native.linear(xs[r : r + 1], w) for r in range(native.MAX_ROWS)])
    exact = xs.double() @ w.double().T
    assert ((alone.double() - exact).abs() <= bound(xs, w)).all()
    for n in range(1, native.MAX_ROWS + 1):
        assert torch.equal(native.linear(xs[:n], w), alone[:n]), n


def test_fp32_kernel_is_thread_independent_and_reads_views():
    """Threads split outputs, not sums: one thread gives two threads' bits. Rows given as a strided view (a
    slice of a wider tensor) are read as their values."""
    g = torch.Generator().manual_seed(1)
    w, wide = torch.randn(200, 512, generator=g), torch.randn(7, 1024, generator=g)
    x = wide[:, 256:768]  # not contiguous
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        y = native.linear(x, w)
        torch.set_num_threads(1)
        assert torch.equal(native.linear(x, w), y)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(y, native.linear(x.contiguous(), w))


def test_where_the_fp32_kernel_runs():
    """packing.linear (the fast path's linear) takes the kernel for fp32 CPU rows 1 to MAX_ROWS, any leading
    shape; torch's F.linear for more rows, bf16, inputs not a multiple of 16, and under autograd."""
    assert native.library() is not None  # this machine and CI's have a C compiler
    g = torch.Generator().manual_seed(2)
    w = torch.randn(48, 64, generator=g)
    x = torch.randn(2, 3, 64, generator=g)
    assert torch.equal(linear(x, w), native.linear(x.reshape(6, 64), w).view(2, 3, 48))
    many = torch.randn(native.MAX_ROWS + 1, 64, generator=g)
    assert native.linear(many, w) is None and torch.equal(linear(many, w), F.linear(many, w))
    assert native.linear(x[0].bfloat16(), w.bfloat16()) is None
    assert native.linear(x[0, :, :40], w[:, :40]) is None  # 40 inputs: not a multiple of 16
    grad = w.clone().requires_grad_()
    y = linear(x, grad)
    assert y.grad_fn is not None and torch.equal(y, F.linear(x, grad))


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not shutil.which("cc"), reason="x86 + cc")
@pytest.mark.parametrize("arch", [["-mavx2", "-mfma"], ["-march=x86-64"]])
def test_kernels_build_and_agree_on_cpus_without_avx512(hf_mixtral, monkeypatch, tmp_path, arch):
    """The library is built with -march=native: on a CPU with AVX2 but no AVX-512 (most laptops), or with neither,
    it must still build (a register constraint for 64-byte vectors once made it fail there, silently leaving
    torch's kernels) and compute the same: the fp32 linear within summation error of float64, W8A8 bit for bit
    its reference (int32 products, no VNNI), and the fp32 engine (Layers.run at decode) transformers' greedy
    tokens."""
    import ctypes
    import subprocess

    from kernels.quant import QuantLinear, w8a8_reference

    so = tmp_path / "linear.so"
    flags = [f for f in native.FLAGS if f != "-march=native"]
    subprocess.run(["cc", *flags, *arch, "-o", str(so), str(native.SOURCE), "-lm"], check=True, timeout=300)
    lib = native.declare(ctypes.CDLL(str(so)))
    monkeypatch.setattr(kernels.native, "library", lambda: lib)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(37, 208, generator=g)  # 37 outputs: a last tile of 1 (W8A8 there: rows interleaved 4 a tile)
    q = QuantLinear.from_linear(torch.nn.Linear(208, 37, bias=False), 8, w8a8=True)
    assert q.row_block == 16
    for n in (1, 2, 7):  # narrow and wide tiles
        xs = torch.randn(n, 208, generator=g)
        assert ((native.linear(xs, w).double() - xs.double() @ w.double().T).abs() <= bound(xs, w)).all()
        assert torch.equal(native.w8a8_linear(xs, q.qweight, q.scale), w8a8_reference(xs, q.values(), q.scale))
        # the same rows alone: each row's sums do not depend on the others (nor on the tile it fell in)
        assert torch.equal(native.linear(xs, w)[-1:], native.linear(xs[-1:], w))
    calls = []
    layers = native.Layers.run
    monkeypatch.setattr(native.Layers, "run", lambda self, *a: calls.append("layers") or layers(self, *a))
    ps = prompts((3, 9))
    got = Engine.from_dir(hf_mixtral).generate(ps, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert calls and [r.token_ids for r in got] == [hf_greedy(hf_model(hf_mixtral), p)[0][:6] for p in ps]


@pytest.mark.parametrize("kernel", ["ours", "none"])
def test_fp32_engine_with_and_without_the_kernels(hf_tiny, monkeypatch, kernel):
    """The fp32 engine runs the C kernels: every step of up to MAX_ROWS tokens, decodes and prompt chunks alike,
    from its tokens to its logits in one call (Layers.run: every layer's attention block and MoE or FFN kernel, the
    LM head); a prompt chunk that cannot run as decode rows (model.token_rows: here made so) a half-layer at a time,
    the linear kernel for fused wq|wk|wv, wo and the LM head, the MoE kernel for a Mixtral layer's experts (the FFN
    kernel for Mistral's dense FFN); a step of more tokens a half-layer at a time too, its linears MKL on the
    transposed fast layout. Where they cannot build (no compiler: library() None) torch's path runs. Greedy tokens
    equal transformers' either way."""
    import kernels.model

    calls: list = []
    if kernel == "none":
        monkeypatch.setattr(kernels.native, "library", lambda: None)
    else:
        for name in ("ffn", "moe"):
            ours = getattr(native.SwiGLUWeights, name)
            monkeypatch.setattr(native.SwiGLUWeights, name,
                                lambda self, x, *a, ours=ours, name=name: calls.append(name) or ours(self, x, *a))
        linear = kernels.native.linear
        monkeypatch.setattr(kernels.native, "linear", lambda x, w: calls.append(tuple(w.shape)) or linear(x, w))
        layers = native.Layers.run
        monkeypatch.setattr(native.Layers, "run", lambda self, t, *a: calls.append(("layers", len(t))) or layers(
            self, t, *a))
    model = build_role(Checkpoint.open(hf_tiny), EngineConfig(), Holds(whole=True)).model
    assert model.output.weight.is_contiguous() == (kernel == "ours")  # [V, D], V > D: stored transposed for MKL
    ref = hf_model(hf_tiny)
    engine = Engine.from_dir(hf_tiny, EngineConfig(decode_steps=1))  # a step a call (decode_steps: below)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    for lengths in ((3, 9), (40,)):  # a first step of 12 tokens, then one of 40
        ps = prompts(lengths)
        got = engine.generate(ps, params)
        assert [r.token_ids for r in got] == [hf_greedy(ref, p)[0][:6] for p in ps]
    if kernel == "none":
        assert calls == []
        return
    assert ("layers", 12) in calls and ("layers", 40) not in calls and calls.count(("layers", 1)) == 5
    calls.clear()
    token_rows = kernels.model.token_rows
    monkeypatch.setattr(kernels.model, "token_rows", lambda seqs, cache: token_rows(seqs, cache) if all(
        s.n == 1 for s in seqs) else None)
    ps = prompts((3, 9))
    got = engine.generate(ps, params)
    assert [r.token_ids for r in got] == [hf_greedy(ref, p)[0][:6] for p in ps]
    a = model.args
    qkv = ((a.n_heads + 2 * a.n_kv_heads) * a.head_dim, a.dim)
    assert {(a.vocab_size, a.dim), qkv, (a.dim, a.n_heads * a.head_dim), "moe" if a.moe else "ffn",
            ("layers", 2)} <= set(calls)


@pytest.mark.parametrize("quant,kv", [("none", "float32"), ("int8", "bfloat16"), ("w8a8", "float32"),
                                     ("bf16", "bfloat16")])
def test_decode_layers_in_one_call_equal_a_call_a_half_layer(hf_tiny, monkeypatch, quant, kv):
    """At decode the engine runs the embedding, every layer and the final norm in one C call
    (Transformer.native_layers: Layers.run); with it off, torch's embedding and norm and a call a half-layer
    (TransformerBlock.start). The same KV cache bit for bit (the same layers' calls), the logits within fp32
    rounding of each other (C's final RMSNorm against torch's) with the same greedy tokens, at every step,
    sequences joining and leaving mid-run (4 prompts of 3 to 14 tokens, 3 at a time, 5 to 12 new tokens; Mistral's
    window of 8 wraps its ring), fp32, int8 (weight-only or W8A8) or bf16 weights (experts, attention and LM
    head), fp32 or bf16 KV cache. The LM head in that call gives the same bits as its own call on the final norm's
    rows, for the step's rows, some of them out of order, and none."""
    from kernels.cache import StepSeq
    from kernels.packing import call
    from kernels.rope import inv_freq

    calls = []
    run = native.Layers.run

    def checked(self, *a):
        calls.append(len(self.parts))
        assert self.head is not None  # every weight kind here has its head in the call
        *step, rows = a
        head, self.head = self.head, None  # the final norm's output (the KV rows written again, the same values)
        try:
            h = run(self, *step, rows)
        finally:
            self.head = head
        for some in (rows.flip(0)[: max(1, len(rows) - 1)], rows[:0]):
            assert torch.equal(run(self, *step, some), call(head_of[0], h[some]))
        return run(self, *a)

    head_of = []  # the one-call engine's LM head
    monkeypatch.setattr(native.Layers, "run", checked)
    config = EngineConfig(dtype="float32", expert_quant=quant, weight_quant=quant, kv_cache_dtype=kv, max_num_seqs=3,
                          decode_steps=1)  # a step a call: every step's logits compared
    logits: dict[str, list[torch.Tensor]] = {}
    engines = {}
    for way in ("one call", "half-layers"):
        eng = engines[way] = Engine.from_dir(hf_tiny, config)
        model = eng.executor.model
        if way == "half-layers":
            model.native_layers = lambda *a: None
        else:
            head_of.append(model.output)
        forward = eng.executor.forward
        eng.executor.forward = lambda *a, way=way, forward=forward: logits.setdefault(way, []).append(
            forward(*a)) or logits[way][-1]
        params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (12, 5, 8, 7)]
        eng.generate(prompts((3, 9, 14, 6)), params)
    assert calls and set(calls) == {engines["one call"].executor.model.args.n_layers}
    assert len(logits["one call"]) == len(logits["half-layers"]) > 10
    for a, b in zip(logits["one call"], logits["half-layers"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert torch.equal(a.argmax(-1), b.argmax(-1))
    caches = [e.executor.cache for e in engines.values()]
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)
    # the metadata is made in the call: a block table too short for its position is refused there, nothing run
    model = engines["one call"].executor.model
    stack, args = model._native_layers[1], model.args
    short = native.decode_inputs([StepSeq([1], 40, 1)], caches[0].block_size, None,
                                 inv_freq(args.head_dim, args.rope_theta, torch.device("cpu")))
    with pytest.raises(ValueError, match="too short"):
        stack.run(torch.tensor([5]), short, args.n_heads, torch.tensor([0]))
    assert torch.equal(caches[0].k, caches[1].k)
    # a linear replaced after packing: its layer no longer holds what the kernels read, so no call takes it
    ff = engines["one call"].executor.model.layers[0].feed_forward
    ffn = ff.experts[0] if hasattr(ff, "experts") else ff
    ffn.w2 = torch.nn.Linear(ffn.w2.in_features, ffn.w2.out_features, bias=False)
    before = len(calls)
    engines["one call"].generate(prompts((4,)), SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert len(calls) == before


@pytest.mark.parametrize("quant,kv", [("none", "float32"), ("w8a8", "float32"), ("none", "bfloat16")])
def test_prompt_chunks_as_decode_rows_equal_the_chunks_attention(hf_tiny, monkeypatch, quant, kv):
    """A step of at most MAX_ROWS tokens runs its prompt chunks as decode rows (model.token_rows: each token its
    own row, its keys written to the pools first and read from there, in the one call of every layer), where a
    chunk's writes do not wrap its ring and the pool stores keys as computed (fp32). Against the same engine with
    chunks attending as chunks (step_metadata, torch's paged attention): at every step the logits within fp32
    rounding (W8A8: within its rounding of the activations) and the same greedy tokens, the KV caches close;
    chunks of up to 12 tokens mixed with decodes, across blocks of 16, sequences joining and leaving, prefix-cache
    hits (the prompts run twice: Mixtral), Mistral's window of 8 (its ring of 16: a chunk that would wrap it runs as
    a chunk). A bf16 pool keeps every chunk a chunk: the same bits as that engine."""
    import kernels.model

    token_rows = kernels.model.token_rows
    used = {"rows": 0, "chunks": 0}

    def counted(seqs, cache):
        rows = token_rows(seqs, cache)
        if any(s.n > 1 for s in seqs):
            used["rows" if rows is not None else "chunks"] += 1
        return rows

    config = EngineConfig(dtype="float32", expert_quant=quant, weight_quant=quant, kv_cache_dtype=kv,
                          max_num_batched_tokens=12, max_num_seqs=3, decode_steps=1)  # every step's logits compared
    logits: dict[str, list[torch.Tensor]] = {}
    engines = {}
    for way in ("rows", "chunks"):
        monkeypatch.setattr(kernels.model, "token_rows", counted if way == "rows" else (
            lambda seqs, cache: token_rows(seqs, cache) if all(s.n == 1 for s in seqs) else None))
        eng = engines[way] = Engine.from_dir(hf_tiny, config)
        forward = eng.executor.forward
        eng.executor.forward = lambda *a, way=way, forward=forward: logits.setdefault(way, []).append(
            forward(*a)) or logits[way][-1]
        params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (12, 5, 8, 7, 4)]
        for _ in range(2):
            eng.generate(prompts((3, 9, 14, 6, 20)), params)
    if kv == "float32":
        assert used["rows"] > 3
        if engines["rows"].executor.model.args.sliding_window:
            assert used["chunks"] > 0
    else:
        assert used["rows"] == 0
    assert len(logits["rows"]) == len(logits["chunks"]) > 20
    atol = 1e-4 if quant == "none" else 5e-2
    for a, b in zip(logits["rows"], logits["chunks"], strict=True):
        if kv != "float32":
            assert torch.equal(a, b)
        torch.testing.assert_close(a, b, atol=atol, rtol=0)
        assert torch.equal(a.argmax(-1), b.argmax(-1))
    caches = [e.executor.cache for e in engines.values()]
    torch.testing.assert_close(caches[0].k, caches[1].k, atol=atol, rtol=0)
    torch.testing.assert_close(caches[0].v, caches[1].v, atol=atol, rtol=0)


@pytest.mark.parametrize("quant,kv", [("none", "float32"), ("w8a8", "float32"), ("none", "bfloat16")])
def test_decode_steps_in_one_call_equal_single_steps(hf_tiny, monkeypatch, quant, kv):
    """engine.decode_steps 4: while every running sequence decodes greedily and none waits, up to 4 steps run in
    one C call (LocalExecutor.decode_steps: each step the single step's call, its token chosen in C as sampling's
    greedy path chooses it). The same tokens, logprobs and finish reasons as one step a call, bit for bit: sequences
    joining (none burst while one waits) and leaving mid-run, a burst cut short by max_tokens and by a stop token
    (the tokens after it dropped), blocks of 4 crossed within a burst, Mistral's window of 8 wrapping its ring,
    prefix-cache hits on blocks named after a burst (the prompts run twice: Mixtral); every block back in the pool
    after. A request sampled, penalized or asking for top logprobs keeps the batch a step a call."""
    from kernels.engine import LocalExecutor

    bursts = []
    decode_steps = LocalExecutor.decode_steps
    monkeypatch.setattr(LocalExecutor, "decode_steps",
                        lambda self, t, seqs, steps: bursts.append(steps) or decode_steps(self, t, seqs, steps))
    ps = prompts((3, 9, 14, 6, 20))
    config = dict(dtype="float32", expert_quant=quant, weight_quant=quant, kv_cache_dtype=kv, block_size=4,
                  max_num_seqs=3, decode_burst_ms=1e9)  # bursts as long as decode_steps (their pace: below)
    one, four = (Engine.from_dir(hf_tiny, EngineConfig(**config, decode_steps=n)) for n in (1, 4))
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (13, 5, 8, 7, 15)]
    runs: dict[str, list] = {"one": [], "four": []}
    for i in range(3):  # the same history each (a prefix-cache hit changes which steps compute a prompt's keys)
        if i == 1:  # the first prompt stops at its 7th token, mid-burst
            params[0] = SamplingParams(max_tokens=13, temperature=0, stop_token_ids=[runs["one"][0][0][0][6]])
        for name, engine in (("one", one), ("four", four)):
            runs[name].append([(c.token_ids, c.logprobs, c.finish_reason) for c in engine.generate(ps, params)])
    assert runs["one"] == runs["four"]
    assert runs["one"][1][0][2] == "stop" and len(runs["one"][1][0][0]) == 7
    assert bursts and max(bursts) == 4 and min(bursts) < 4  # a burst cut to the tokens left
    # alone: its first token from the prompt's step, then bursts of 4 (tokens 2-5, 6-9, ...): a stop token at the
    # 7th (the first place its id occurs) ends it in the middle of a burst
    alone = one.generate(ps[2:3], SamplingParams(max_tokens=13, temperature=0, ignore_eos=True))[0].token_ids
    at = next(i for i in range(6, 9) if alone[i] not in alone[:i])
    stop = SamplingParams(max_tokens=13, temperature=0, stop_token_ids=[alone[at]])
    bursts.clear()
    got = [[(c.token_ids, c.logprobs, c.finish_reason) for c in e.generate(ps[2:3], stop)] for e in (one, four)]
    assert got[0] == got[1] and got[0][0][2] == "stop" and len(got[0][0][0]) == at + 1 and bursts[:2] == [4, 4]
    for engine in (one, four):
        assert engine.scheduler.pool.num_free == engine.config.num_blocks and not engine.has_unfinished()
    bursts.clear()
    for other in (dict(temperature=0.8, seed=3), dict(repetition_penalty=1.3), dict(logprobs=2)):
        mixed = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                 SamplingParams(**{"max_tokens": 6, "temperature": 0, "ignore_eos": True, **other})]
        got = [(c.token_ids, c.logprobs, c.top_logprobs) for c in four.generate(ps[:2], mixed)]
        assert got == [(c.token_ids, c.logprobs, c.top_logprobs) for c in one.generate(ps[:2], mixed)]
    assert bursts == []


def test_decode_bursts_take_as_many_steps_as_decode_burst_ms_holds(hf_mixtral, monkeypatch):
    """A burst takes as many steps as fit in engine.decode_burst_ms at the last step's pace (seconds per token a
    sequence got), decode_steps at most: on a clock where every step takes 6 ms, bursts of 3 in 20 ms (then 2 when a
    sequence has 2 tokens left), none in 5 ms; the same tokens either way. A model that runs no burst is asked once."""
    import kernels.engine
    from kernels.engine import LocalExecutor

    clock, bursts = [0.0], []
    forward, decode_steps = LocalExecutor.forward, LocalExecutor.decode_steps

    def timed_forward(self, *a):
        clock[0] += 0.006
        return forward(self, *a)

    def timed_steps(self, t, seqs, steps):
        clock[0] += 0.006 * steps
        bursts.append(steps)
        return decode_steps(self, t, seqs, steps)

    monkeypatch.setattr(kernels.engine, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(LocalExecutor, "forward", timed_forward)
    monkeypatch.setattr(LocalExecutor, "decode_steps", timed_steps)
    ps, params = prompts((5, 7)), SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    runs = {}
    for ms in (20, 5):
        bursts.clear()
        engine = Engine.from_dir(hf_mixtral, EngineConfig(dtype="float32", decode_steps=8, decode_burst_ms=ms))
        runs[ms] = [c.token_ids for c in engine.generate(ps, params)]
        # the prompts' step (6 ms for a token each: the pace), then bursts of 3 + 3 + 3 tokens and the last 2
        assert bursts == ([3, 3, 3, 2] if ms == 20 else [])
    assert runs[20] == runs[5]

    def declined(self, t, seqs, steps):
        bursts.append(steps)

    monkeypatch.setattr(LocalExecutor, "decode_steps", declined)
    bursts.clear()
    engine = Engine.from_dir(hf_mixtral, EngineConfig(dtype="float32", decode_steps=8, decode_burst_ms=20))
    assert [c.token_ids for c in engine.generate(ps, params)] == runs[20] and bursts == [3]


def test_decode_steps_must_be_at_least_one():
    with pytest.raises(ValueError, match="decode_steps must be >= 1, got 0"):
        EngineConfig(decode_steps=0)
    with pytest.raises(ValueError, match="decode_burst_ms must be >= 0, got -1"):
        EngineConfig(decode_burst_ms=-1)


def test_token_rows_are_the_steps_tokens_where_that_is_the_same_attention():
    from kernels.cache import KVCache, StepSeq
    from kernels.model import token_rows

    cache = KVCache(1, 16, 4, 1, 16)
    decode = [StepSeq([1, 2], 5, 1), StepSeq([3], 0, 1)]
    assert token_rows(decode, cache) == decode
    mixed = [StepSeq([1, 2], 5, 1), StepSeq([3, 4], 2, 3)]  # a chunk: positions 2, 3, 4 of a ring of 8
    assert token_rows(mixed, cache) == [StepSeq([1, 2], 5, 1), *(StepSeq([3, 4], p, 1) for p in (2, 3, 4))]
    assert token_rows([StepSeq([3, 4], 6, 3)], cache) is None  # its writes wrap the ring (a window's)
    assert token_rows([StepSeq(list(range(9)), 0, native.MAX_ROWS + 1)], cache) is None  # a chunk past MAX_ROWS
    assert token_rows([StepSeq([1] * 9, 0, 1)] * (native.MAX_ROWS + 1), cache) is not None  # decode: any batch
    bf16 = KVCache(1, 16, 4, 1, 16, dtype=torch.bfloat16)
    assert token_rows(mixed, bf16) is None and token_rows(decode, bf16) == decode


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,KV,hd", [(8, 2, 32), (12, 2, 80)])
def test_decode_attention_kernel_equals_sdpa_and_is_per_sequence(dtype, H, KV, hd):
    """The C kernel reads the paged pools in place (decode_attention on CPU) and gives torch's SDPA over the
    gathered keys (decode_attention_native) within fp32 rounding, on sequences of different lengths, a sliding
    window that wrapped its ring, GQA 8/2 and 12/2 (a kv-head's heads in blocks of 4: 4 and 2), head_dim 32 and 80
    (outputs in blocks of 64: 64 and 16); each sequence's output is the same bits alone as in the batch."""
    from kernels.attention import decode_attention, decode_attention_native
    from kernels.cache import DecodeMetadata, StepSeq

    g = torch.Generator().manual_seed(3)
    B, block, S = 5, 4, 64
    pools = [torch.randn(S, KV, hd, generator=g).to(dtype) for _ in range(2)]
    tables = torch.randperm(S // block, generator=g).tolist()
    seqs = [StepSeq(tables[3 * b : 3 * b + 3], start, 1) for b, start in enumerate([0, 5, 11, 17, 40])]
    q, k, v = (torch.randn(B, n, hd, generator=g).to(dtype) for n in (H, KV, KV))
    for window in (None, 6):
        if window is None:
            seqs_w = [s for s in seqs if s.start < 12]  # no window: the ring (12 slots) holds every position
        else:
            seqs_w = seqs
        n = len(seqs_w)
        meta = DecodeMetadata.build(seqs_w, block, window)
        kp, vp = (p.clone() for p in pools)
        got = decode_attention(q[:n], k[:n], v[:n], kp, vp, meta)
        ref = decode_attention_native(q[:n], kp, vp, meta)
        assert got.dtype == dtype
        atol = 1e-5 if dtype == torch.float32 else 2 ** -7
        torch.testing.assert_close(got.float(), ref.float(), atol=atol, rtol=0)
        for b in range(n):
            one = DecodeMetadata.build([seqs_w[b]], block, window)
            alone = native.decode_attention(q[b : b + 1], kp, vp, one.ctx_slots, one.mask[:, 0, 0])
            batch = native.decode_attention(q[:n], kp, vp, meta.ctx_slots, meta.mask[:, 0, 0])
            assert torch.equal(alone[0], batch[b]), (window, b)


@pytest.mark.parametrize("quant", [None, 8, "w8a8", 16])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_moe_and_ffn_kernels_equal_the_torch_path(k, quant):
    """The C MoE kernel (MoeLayer.start on CPU in fp32, experts fp32, int8, W8A8 or bf16) routes as kernels/moe.py does
    (the same experts per token) and gives its output within fp32 rounding at 1 to MAX_ROWS tokens; each
    token's result is the same bits alone as in any batch. The FFN kernel (FeedForward.forward) likewise. Both
    also take a layer's FFN half, h + f(ffn_norm(h)), in the one call."""
    from kernels.args import MoeArgs
    from kernels.model import Experts, FeedForward, MoeLayer, RMSNorm, pack_
    from kernels.moe import moe
    from kernels.quant import quantize_experts

    torch.manual_seed(k)
    D, F_, E = 64, 96, 8
    m = MoeLayer(Experts(FeedForward(D, F_) for _ in range(E)), torch.nn.Linear(D, E, bias=False), MoeArgs(E, k))
    if quant:
        quantize_experts(m, 8 if quant == "w8a8" else quant, w8a8=quant == "w8a8")
    pack_(m)
    assert m.native is not None and all(ff.native is not None for ff in m.experts)
    xs = torch.randn(native.MAX_ROWS, D, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        alone = torch.cat([m(x) for x in xs.split(1)])
        for n in (1, 2, 7, native.MAX_ROWS):
            got = m(xs[:n])
            torch.testing.assert_close(got, moe(xs[:n], m.gate.weight, k, m.experts.forward), atol=2e-6, rtol=1e-5)
            assert torch.equal(got, alone[:n]), n
        ff = m.experts[3]
        torch.testing.assert_close(ff(xs), ff.forward_native(xs), atol=2e-6, rtol=1e-5)
        assert ff.native.weights.ffn(xs) is not None
        # the FFN half of a layer, h + f(ffn_norm(h)), in one call (TransformerBlock.start): norm and residual in C
        norm = RMSNorm(D, 1e-5)
        norm.weight.copy_(torch.rand(D, generator=torch.Generator().manual_seed(1)) + 0.5)
        torch.testing.assert_close(m.native_call(xs, norm), xs + moe(norm(xs), m.gate.weight, k, m.experts.forward),
                                   atol=4e-6, rtol=1e-5)
        torch.testing.assert_close(ff.native_call(xs, norm), xs + ff.forward_native(norm(xs)), atol=4e-6, rtol=1e-5)
        assert torch.equal(m.native_call(xs, norm)[:3], m.native_call(xs[:3], norm))
        assert m.native.weights.moe(xs.bfloat16(), m.gate.weight, k) is None  # bf16: torch's path
        assert m.native.weights.moe(torch.cat([xs, xs]), m.gate.weight, k) is None  # more rows: torch's path
        ff.w2 = torch.nn.Linear(F_, D, bias=False)  # replaced after packing: no longer what the kernels read
        assert not m.native.current(list(m.experts)) and not ff.native.current([ff])


@pytest.mark.parametrize("weight_quant", ["none", "int8", "w8a8", "bf16"])
@pytest.mark.parametrize("kv", [torch.float32, torch.bfloat16])
def test_attention_block_equals_the_torch_path_and_is_per_sequence(hf_tiny, weight_quant, kv):
    """The C attention block (TransformerBlock.start at decode on CPU in fp32: norm, QKV, RoPE, KV write,
    attention over the pools in place, wo, residual) against the torch path (Attention.native off): decode logits
    and the pools it wrote within fp32 rounding, fp32, int8, W8A8 or bf16 attention weights, fp32 or bf16 pools
    (Mistral: a sliding window). A sequence's decode logits are the same bits alone as beside another (each prefilled
    alone)."""
    from kernels.cache import KVCache, StepSeq
    from kernels.model import Attention, Step

    model = build_role(Checkpoint.open(hf_tiny), EngineConfig(weight_quant=weight_quant), Holds(whole=True)).model
    a = model.args
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    assert attns and all(m.native is not None for m in attns)
    ps = prompts((5, 12))
    tables = [[0, 1, 2, 3], [4, 5, 6, 7]]

    def run(seqs_in_decode: list[int], native_on: bool) -> tuple[torch.Tensor, KVCache]:
        saved = [m.native for m in attns]
        if not native_on:
            for m in attns:
                m.native = None
        cache = KVCache(a.n_layers, 16, 4, a.n_kv_heads, a.head_dim, dtype=kv)
        try:
            with torch.no_grad():
                for i, p in enumerate(ps):  # each prompt prefilled alone
                    model(torch.tensor(p), Step.begin([StepSeq(tables[i], 0, len(p))], a, cache), torch.tensor([0]))
                seqs = [StepSeq(tables[i], len(ps[i]), 1) for i in seqs_in_decode]
                step = Step.begin(seqs, a, cache)
                logits = model(torch.tensor([7, 9][: len(seqs)]), step, torch.arange(len(seqs)))
        finally:
            for m, n in zip(attns, saved, strict=True):
                m.native = n
        return logits, cache

    ours, cache = run([0, 1], True)
    ref, ref_cache = run([0, 1], False)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
    atol = 1e-5 if kv == torch.float32 else 2**-6
    torch.testing.assert_close(cache.k.float(), ref_cache.k.float(), atol=atol, rtol=2**-7)
    torch.testing.assert_close(cache.v.float(), ref_cache.v.float(), atol=atol, rtol=2**-7)
    alone, _ = run([0], True)
    assert torch.equal(alone[0], ours[0])


@pytest.mark.parametrize("window", [None, 5, 12])
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_decode_metadata_in_c_equals_the_reference(window, batch):
    """native.decode_meta_of (a decode step's prologue in one C call) against DecodeMetadata.build and rope_freqs, the
    references: positions, write and read slots and mask equal, RoPE within an ulp; cached lengths 0..40 (windows
    wrap), scattered block tables longer than their context, unequal contexts side by side. Step.begin at decode on
    CPU holds what it is made of (decode_inputs), and its meta, freqs and decode_args are the C call's when read. A
    table too short for its position is refused."""
    import random

    from kernels.args import ModelArgs
    from kernels.cache import DecodeMetadata, KVCache, StepSeq, blocks_for
    from kernels.model import Step
    from kernels.rope import inv_freq, rope_freqs

    rnd = random.Random(batch)
    bs, hd, theta = 4, 16, 1e6
    free = list(range(1, 400))
    rnd.shuffle(free)
    cached = [rnd.randint(0, 40) for _ in range(batch)]
    tables = [[free.pop() for _ in range(blocks_for(c + rnd.randint(1, 9), bs, window))] for c in cached]
    seqs = [StepSeq(t, c, 1) for t, c in zip(tables, cached, strict=True)]
    inputs = native.decode_inputs(seqs, bs, window, inv_freq(hd, theta, torch.device("cpu")))
    assert inputs is not None
    meta, rope, mask = native.decode_meta_of(inputs)
    ref = DecodeMetadata.build(seqs, bs, window)
    for name in ("positions", "ctx_slots", "mask", "write_slots"):
        assert torch.equal(getattr(meta, name), getattr(ref, name)), name
    assert torch.equal(mask, ref.mask[:, 0, 0])
    ref_rope = torch.view_as_real(rope_freqs(ref.positions, hd, theta))
    torch.testing.assert_close(rope, ref_rope, atol=2 * torch.finfo(torch.float32).eps, rtol=0)
    args = ModelArgs(dim=64, n_layers=1, head_dim=hd, hidden_dim=64, n_heads=2, n_kv_heads=1, vocab_size=32,
                     rope_theta=theta, sliding_window=window)
    step = Step.begin(seqs, args, KVCache(1, 400, bs, 1, hd))
    assert step.decode is not None and "meta" not in step.__dict__  # made only when read
    assert torch.equal(step.decode_args[0], rope) and torch.equal(torch.view_as_real(step.freqs), rope)
    assert torch.equal(step.decode_args[3], mask) and isinstance(step.meta, DecodeMetadata)
    for name in ("positions", "ctx_slots", "mask", "write_slots"):
        assert torch.equal(getattr(step.meta, name), getattr(ref, name)), name
    if window is None:
        with pytest.raises(ValueError, match="too short"):
            native.decode_meta_of(native.decode_inputs([StepSeq(tables[0][:1], 4, 1)], bs, window,
                                                       inv_freq(hd, theta, torch.device("cpu"))))


def test_row_stats_equal_torchs_max_and_logsumexp(monkeypatch):
    """native.row_stats (sampling's pass over the logits): torch.max's values and indices exactly (ties: the first;
    NaN: the first NaN), torch.logsumexp's within a few ulp, on rows of -inf, a V not a multiple of 16 or of the
    chunks a row is split in (4096); the same bits for a row alone, in a batch, at 1, 2 or 3 threads; sample() gives
    the same tokens and logprobs (within fp32 rounding) with it as with torch's ops."""
    from kernels.sampling import SamplingParams, sample

    g = torch.Generator().manual_seed(0)
    for V in (32000, 1000, 37, 5):
        x = torch.randn(9, V, generator=g) * 8
        x[1, V // 3] = x[1, V // 2] = 1e3  # a tie: the first
        x[2, : V - 1] = float("-inf")  # one finite
        x[3, V // 4] = x[3, V - 1] = float("nan")
        x[4] = float("-inf")
        x[5] = torch.rand(V, generator=g) * 3  # every term counts in the sum
        best, index, lse = native.row_stats(x)
        want = x.max(-1)
        torch.testing.assert_close(best, want.values, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(index, want.indices), V
        torch.testing.assert_close(lse, torch.logsumexp(x, -1), rtol=4e-7, atol=1e-6, equal_nan=True)
        threads = torch.get_num_threads()
        try:
            for n in (1, 3):
                torch.set_num_threads(n)
                for at in (slice(None), slice(3, 4), slice(7, 8)):  # all rows; a row of NaN, of randn alone
                    for a, b in zip(native.row_stats(x[at]), (best, index, lse), strict=True):
                        assert torch.equal(a.nan_to_num(), b[at].nan_to_num()), (V, n, at)
        finally:
            torch.set_num_threads(threads)
    logits = torch.randn(5, 512, generator=g) * 4
    params = [SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0.8, seed=1),
              SamplingParams(temperature=0, repetition_penalty=1.3), SamplingParams(temperature=0),
              SamplingParams(top_k=5, seed=2)]

    def run():
        return sample(logits.clone(), params, [torch.Generator().manual_seed(i) for i in range(5)], [[1, 2, 3]] * 5)

    ours = run()
    monkeypatch.setattr(kernels.native, "library", lambda: None)
    ref = run()
    assert [s.token for s in ours] == [s.token for s in ref]
    torch.testing.assert_close([s.logprob for s in ours], [s.logprob for s in ref], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[0].top, ref[0].top, rtol=1e-5, atol=1e-5)


def test_every_linear_takes_zero_rows():
    """A prefill chunk in which no sequence finishes its prompt runs the LM head on 0 rows: each kernel's linear gives
    [0, O] (it raised for int8, W8A8 and bf16 weights: a prompt longer than max_num_batched_tokens failed there)."""
    from kernels.quant import BF16Linear, QuantLinear

    lin = torch.nn.Linear(64, 48, bias=False)
    x = torch.zeros(0, 64)
    modules = [QuantLinear.from_linear(lin, 8), QuantLinear.from_linear(lin, 8, w8a8=True), BF16Linear.from_linear(lin)]
    with torch.no_grad():
        assert [tuple(m(x).shape) for m in modules] == [(0, 48)] * 3

