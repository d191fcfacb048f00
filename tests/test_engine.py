"""The single-process engine against transformers' MixtralForCausalLM / MistralForCausalLM."""

import mmap
import re
from pathlib import Path

import pytest
import torch
from conftest import mistral_copy
from torch import nn

from kernels.build import Holds, build_role
from kernels.cache import KVCache, StepSeq, blocks_for
from kernels.checkpoint import Checkpoint
from kernels.engine import CacheLost, Engine, EngineConfig, Request
from kernels.model import Step
from kernels.packing import into_huge_pages_
from kernels.sampling import SamplingParams

NEW = 32
GREEDY = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True, logprobs=0)


def prompts(n_list=(3, 9, 17, 26), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (n,), generator=g).tolist() for n in n_list]


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(model, prompt):
    """transformers' generate: 32 new tokens, not stopping at EOS (as ignore_eos), and their raw logits."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                         pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    return out.sequences[0, len(prompt):].tolist(), torch.log_softmax(torch.cat(out.logits).float(), -1)


def test_prefill_logits_close(hf_tiny):
    """All positions of a batch of prompts of different lengths, in one flat step."""
    model = build_role(Checkpoint.open(hf_tiny), EngineConfig(), Holds(whole=True)).model
    ps = prompts()
    cache = KVCache(model.args.n_layers, 64, 4, model.args.n_kv_heads, model.args.head_dim)
    tables, first = [], 0
    for p in ps:
        n = blocks_for(len(p), 4, model.args.sliding_window)
        tables.append(list(range(first, first + n)))
        first += n
    step = Step.begin([StepSeq(t, 0, len(p)) for t, p in zip(tables, ps, strict=True)], model.args, cache)
    tokens = torch.tensor([t for p in ps for t in p])
    with torch.no_grad():
        ours = model(tokens, step, torch.arange(len(tokens))).split([len(p) for p in ps])
        ref = hf_model(hf_tiny)
        for p, logits in zip(ps, ours, strict=True):
            expected = ref(torch.tensor([p])).logits[0]
            torch.testing.assert_close(logits, expected, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("cuts", [(1, 31), (31, 1), (16, 16)])
def test_micro_batches_in_ping_pong_equal_one_batch(hf_tiny, cuts):
    """Transformer.run_layers on two micro-batches (the pipeline's micro_batches 2), as unequal as 1 sequence
    and 31, gives what one batch gives: in a prefill step, and in a decode step that reads the KV cache the
    micro-batches wrote. cuts: where each step splits its 32 sequences."""
    model = build_role(Checkpoint.open(hf_tiny), EngineConfig(), Holds(whole=True)).model
    a = model.args
    ps = prompts(n_list=[21] + [2 + i % 7 for i in range(31)])
    tables = [list(range(4 * i, 4 * i + 4)) for i in range(len(ps))]  # 16 tokens a sequence at least
    steps = [([StepSeq(t, 0, len(p)) for t, p in zip(tables, ps, strict=True)], [t for p in ps for t in p]),
             ([StepSeq(t, len(p), 1) for t, p in zip(tables, ps, strict=True)], [p[0] for p in ps])]

    def run(split: bool) -> list[torch.Tensor]:
        cache, logits = KVCache(a.n_layers, 4 * len(ps), 16, a.n_kv_heads, a.head_dim), []
        for (seqs, tokens), cut in zip(steps, cuts, strict=True):
            groups = [seqs[:cut], seqs[cut:]] if split else [seqs]
            hs = model.tok_embeddings(torch.tensor(tokens)).split([sum(s.n for s in g) for g in groups])
            out = model.run_layers(list(hs), [Step.begin(g, a, cache) for g in groups], range(a.n_layers))
            logits.append(model.output(model.norm(torch.cat(out))))
        return logits

    with torch.no_grad():
        for one, two in zip(run(False), run(True), strict=True):
            torch.testing.assert_close(two, one, atol=1e-5, rtol=1e-5)
            assert torch.equal(two.argmax(-1), one.argmax(-1))


def test_greedy_tokens_identical(hf_tiny):
    engine = Engine.from_dir(hf_tiny)
    ps = prompts()
    results = engine.generate(ps, GREEDY)
    ref = hf_model(hf_tiny)
    for p, r in zip(ps, results, strict=True):
        tokens, logprobs = hf_greedy(ref, p)
        assert r.token_ids == tokens
        assert r.finish_reason == "length"
        expected = logprobs.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(r.logprobs), expected, atol=1e-4, rtol=1e-4)


def test_mistral_format_copy_gives_same_tokens(hf_tiny, tmp_path):
    native = mistral_copy(hf_tiny, tmp_path / "native")
    assert Checkpoint.open(native).format == "mistral"
    assert Checkpoint.open(native).args == Checkpoint.open(hf_tiny).args
    ps = prompts((5, 14))
    hf_out = [r.token_ids for r in Engine.from_dir(hf_tiny).generate(ps, GREEDY)]
    native_out = [r.token_ids for r in Engine.from_dir(native).generate(ps, GREEDY)]
    assert native_out == hf_out


def test_output_does_not_depend_on_batch_or_join_time(hf_tiny):
    """A sequence alone == the same sequence joining mid-run, beside others, with chunked prefill."""
    ps = prompts((4, 21, 30, 7), seed=3)
    alone = [Engine.from_dir(hf_tiny).generate([p], GREEDY)[0].token_ids for p in ps]

    # 8 tokens per step at most: the long prompts prefill in chunks while the others decode
    engine = Engine.from_dir(hf_tiny, EngineConfig(max_num_seqs=3, max_num_batched_tokens=8, kv_cache_tokens=512,
                                                   block_size=4))
    got = {i: [] for i in range(len(ps))}
    join_at = {0: 0, 1: 2, 2: 5, 3: 11}  # step at which each request arrives
    step = 0
    while step <= max(join_at.values()) or engine.has_unfinished():
        for i, s in join_at.items():
            if s == step:
                engine.add_request(Request(str(i), ps[i], GREEDY))
        for ev in engine.step():
            got[int(ev.request_id)].append(ev.token)
        assert engine.num_running <= 3
        step += 1
    assert [got[i] for i in range(len(ps))] == alone
    assert engine.kv_cache_usage == 0  # every block returned


def test_kv_cache_is_bounded_and_queues(hf_mixtral):
    """Reserving the worst case, a cache with room for two sequences: the rest wait their turn, all finish,
    memory comes back. (On demand, the default, admits more and preempts: tests/test_kv_blocks.py.)"""
    cfg = EngineConfig(kv_cache_tokens=2 * 48, block_size=16, kv_allocation="reserve")
    engine = Engine.from_dir(hf_mixtral, cfg)
    ps = prompts((10, 12, 14, 16, 11))
    for i, p in enumerate(ps):
        engine.add_request(Request(str(i), p, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)))
    peak = 0
    while engine.has_unfinished():
        engine.step()
        peak = max(peak, engine.num_running)
        assert engine.kv_cache_usage <= 1
    assert peak == 2
    assert engine.kv_cache_usage == 0
    with pytest.raises(ValueError, match="KV cache"):
        engine.add_request(Request("big", ps[0], SamplingParams(max_tokens=200)))


def test_abort_frees_cache(hf_mixtral):
    engine = Engine.from_dir(hf_mixtral)
    engine.add_request(Request("a", prompts((9,))[0], SamplingParams(max_tokens=50, ignore_eos=True)))
    engine.step()
    assert engine.kv_cache_usage > 0
    engine.abort("a")
    assert engine.kv_cache_usage == 0 and not engine.has_unfinished()
    assert engine.step() == []


@pytest.mark.parametrize("bad, match", [
    (Request("e", [], GREEDY), "empty"),
    (Request("v", [1, 99999], GREEDY), r"\[0, 512\)"),
    (Request("c", [1] * 1000, SamplingParams(max_tokens=100)), "context of 1024"),
])
def test_bad_requests_are_refused(hf_mixtral, bad, match):
    with pytest.raises(ValueError, match=match):
        Engine.from_dir(hf_mixtral).add_request(bad)


@pytest.mark.parametrize("n_params", [3, 5])
def test_generate_refuses_a_params_list_of_another_length(hf_mixtral, n_params):
    engine = Engine.from_dir(hf_mixtral)
    with pytest.raises(ValueError, match=f"params: {n_params} SamplingParams for 4 prompts"):
        engine.generate(prompts(), [GREEDY] * n_params)
    assert not engine.has_unfinished()  # refused before any prompt was queued


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_close_to_fp32(hf_mixtral, dtype):
    ps = prompts((6, 11))
    fp32 = Engine.from_dir(hf_mixtral).generate(ps, SamplingParams(max_tokens=4, temperature=0, logprobs=5))
    half = Engine.from_dir(hf_mixtral, EngineConfig(dtype=dtype)).generate(
        ps, SamplingParams(max_tokens=1, temperature=0, logprobs=5))
    assert half[0].token_ids[0] == fp32[0].token_ids[0]
    for a, b in zip(fp32, half, strict=True):  # the first token's top-5 logprobs agree to half-precision accuracy
        top_a, top_b = dict(a.top_logprobs[0]), dict(b.top_logprobs[0])
        shared = set(top_a) & set(top_b)
        assert len(shared) >= 4, (top_a, top_b)  # a near-tie may swap the fifth, no more
        for t in shared:
            assert abs(top_a[t] - top_b[t]) < 0.15


@pytest.mark.parametrize("kv", ["float16", "bfloat16"])
def test_half_precision_kv_cache_halves_memory_and_stays_close(hf_mixtral, kv):
    """engine.kv_cache_dtype on fp32 weights: the cache takes half the bytes. Prompts prefilled in chunks
    (the later chunks and the decodes read cached keys as stored) then decoded greedily: fp16 keeps every
    token of fp32's, the chosen tokens' logprobs within 1e-2 (measured 5e-3). bf16 (8 bits of mantissa)
    on this checkpoint, whose weights (std 0.2) make attention sharp, moves logprobs by up to 0.6 and
    flips near-ties later on: checked on the first token's top-5, as bf16 weights are."""
    ps = prompts()
    cfg = dict(block_size=4, max_num_batched_tokens=16, max_num_seqs=4)
    fp32 = Engine.from_dir(hf_mixtral, EngineConfig(**cfg))
    half = Engine.from_dir(hf_mixtral, EngineConfig(**cfg, kv_cache_dtype=kv))
    assert half.executor.cache.k.dtype == getattr(torch, kv)
    assert half.executor.cache.nbytes * 2 == fp32.executor.cache.nbytes
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True, logprobs=5)
    ref, out = fp32.generate(ps, params), half.generate(ps, params)
    for a, b in zip(ref, out, strict=True):
        if kv == "float16":
            assert b.token_ids == a.token_ids
            torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), atol=1e-2, rtol=0)
        assert b.token_ids[0] == a.token_ids[0]
        top_a, top_b = dict(a.top_logprobs[0]), dict(b.top_logprobs[0])
        assert len(set(top_a) & set(top_b)) >= 4, (top_a, top_b)
        assert all(abs(top_a[t] - top_b[t]) < 0.15 for t in set(top_a) & set(top_b)), (top_a, top_b)


def test_kv_cache_dtype_auto_follows_dtype_and_unknown_is_named():
    assert EngineConfig().kv_dtype(torch.bfloat16) == torch.bfloat16
    assert EngineConfig(kv_cache_dtype="float32").kv_dtype(torch.bfloat16) == torch.float32
    with pytest.raises(ValueError, match="kv_cache_dtype must be 'auto' or one of .* got 'int8'"):
        EngineConfig(kv_cache_dtype="int8")


def test_waiting_queue_is_bounded(hf_mixtral):
    from kernels.engine import QueueFull

    engine = Engine.from_dir(hf_mixtral, EngineConfig(max_num_seqs=1, max_queued_requests=2))
    for i in range(2):
        engine.add_request(Request(str(i), [5, 6], GREEDY))
    with pytest.raises(QueueFull, match="2 requests are already waiting"):
        engine.add_request(Request("x", [5, 6], GREEDY))
    engine.step()  # one is admitted: room again
    engine.add_request(Request("y", [5, 6], GREEDY))


class LosingExecutor:
    """The local executor, except that its whole KV cache is wiped (zeroed) at the chosen steps and the
    step fails with CacheLost: what a restarted attention actor means to the router."""

    def __init__(self, inner, lose_at: set[int]):
        self.inner, self.lose_at, self.steps = inner, lose_at, 0

    def forward(self, tokens, seqs, logits_index):
        self.steps += 1
        if self.steps in self.lose_at:
            for t in (self.inner.cache.k, self.inner.cache.v):
                t.zero_()
            raise CacheLost("attention actor restarted")
        return self.inner.forward(tokens, seqs, logits_index)


def test_lost_kv_cache_is_recomputed_and_output_unchanged(hf_tiny):
    """Losing the cache mid-prefill and mid-decode changes no token: running sequences recompute their
    cache from prompt + generated tokens. (Mistral's window of 8 is shorter than what is recomputed.)"""
    ps = prompts()
    seeded = SamplingParams(max_tokens=NEW, temperature=0.8, seed=7, ignore_eos=True)
    expected = Engine.from_dir(hf_tiny).generate(ps, [GREEDY, GREEDY, seeded, seeded])
    engine = Engine.from_dir(hf_tiny, EngineConfig(max_num_batched_tokens=16, max_num_seqs=4))
    engine.executor = LosingExecutor(engine.executor, lose_at={2, 9, 20})
    got = engine.generate(ps, [GREEDY, GREEDY, seeded, seeded])
    assert engine.recomputes == 3 and engine.scheduler.pool.num_free == engine.config.num_blocks
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    for a, b in zip(got[:2], expected[:2], strict=True):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)


def test_bf16_prepacked_equals_reference_path(hf_tiny):
    """In bf16 on CPU, pack_ holds the attention projections, the experts and the LM head prepacked for
    oneDNN (kernels.packing.PackedLinear; wq|wk|wv and w1|w3 each one stack, of which the linears are
    PackedParts), their weights once: prefill and decode logits are those of plain nn.Linear modules on the
    same weights, bit for bit, and the weights unpack to the checkpoint's."""
    from torch import nn

    from kernels.model import Attention, FeedForward, Transformer
    from kernels.packing import PackedLinear, PackedPart, onednn_bf16

    if not onednn_bf16():
        pytest.skip("this CPU / torch build has no oneDNN bf16 linear: bf16 stays on F.linear")
    def dense(model):  # (owner, name) of each attention projection, expert linear and of the LM head
        return [(m, n) for m in model.modules() for n in ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")
                if isinstance(m, Attention | FeedForward | Transformer) and hasattr(m, n)]

    cfg = EngineConfig(dtype="bfloat16")
    packed = build_role(Checkpoint.open(hf_tiny), cfg, Holds(whole=True)).model
    a = packed.args
    assert len(dense(packed)) == (4 + 3 * (a.moe.num_experts if a.moe else 1)) * a.n_layers + 1
    assert all(isinstance(getattr(m, n), PackedPart if n in ("wq", "wk", "wv", "w1", "w3") else PackedLinear)
               for m, n in dense(packed))
    for m in packed.modules():
        if isinstance(m, Attention | FeedForward):  # one stack, computed by one call (the fast path)
            parts = (m.wq, m.wk, m.wv) if isinstance(m, Attention) else (m.w1, m.w3)
            assert m.packed.current(*parts) and all(p.stack is m.packed.weight for p in parts)
    plain = build_role(Checkpoint.open(hf_tiny), cfg, Holds(whole=True)).model
    for m, n in dense(plain):
        w = getattr(m, n).weight
        linear = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        linear.weight = nn.Parameter(w, requires_grad=False)
        setattr(m, n, linear)  # the reference: F.linear on the unpacked weight
    head = Checkpoint.open(hf_tiny).load(["output.weight"], dtype=torch.bfloat16)["output.weight"]
    assert torch.equal(packed.output.weight, head)
    assert torch.equal(decode_logits(packed), decode_logits(plain))


def decode_logits(model):
    """Logits of a prefill step of two prompts, then of a decode step of both, on a fresh cache."""
    a = model.args
    ps = prompts((5, 12))
    cache, out = KVCache(a.n_layers, 16, 4, a.n_kv_heads, a.head_dim, dtype=model.dtype), []
    steps = [([StepSeq([0, 1, 2, 3], 0, 5), StepSeq([4, 5, 6, 7], 0, 12)], ps[0] + ps[1]),
             ([StepSeq([0, 1, 2, 3], 5, 1), StepSeq([4, 5, 6, 7], 12, 1)], [7, 9])]
    with torch.no_grad():
        for seqs, tokens in steps:
            step = Step.begin(seqs, a, cache)
            out.append(model(torch.tensor(tokens), step, torch.arange(len(tokens))))
    return torch.cat(out)


def huge_page_advised(address: int) -> tuple[int, int] | None:
    """(bytes, bytes in transparent huge pages) of this process's mapping holding `address` if it is advised for
    huge pages (MADV_HUGEPAGE: "hg" in /proc/self/smaps), else None."""
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", Path("/proc/self/smaps").read_text()):
        lo, hi = (int(a, 16) for a in block.split(None, 1)[0].split("-"))
        if lo <= address < hi:
            fields = dict(re.findall(r"^(\w+):\s+(.*)$", block, re.M))
            if "hg" not in fields["VmFlags"].split():
                return None
            return hi - lo, int(fields["AnonHugePages"].split()[0]) << 10
    return None


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="Linux only")
def test_weights_move_into_huge_pages_in_place(tmp_path):
    """into_huge_pages_ (pack_ runs it on every weight but the embedding's) moves tensors' memory into one
    mapping advised for transparent huge pages: values, dtypes, shapes, strides and the views among them as they
    were, a tensor safetensors read in place (its file mapping) too; a leaf that requires grad still does and gets
    one; tensors elsewhere (meta) are left."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    save_file({"w": torch.randn(512, 1024, generator=g)}, tmp_path / "w.safetensors")
    with safe_open(tmp_path / "w.safetensors", framework="pt") as f:
        mapped = f.get_tensor("w")
    assert huge_page_advised(mapped.data_ptr()) is None
    big = torch.randn(1200, 1000, generator=g)  # 4.8 MB: a 2 MB aligned page at least
    half = big[600:]  # a view at an offset
    tall = torch.randn(700, 300, generator=g).t()  # strided, not contiguous
    codes = torch.randint(-127, 128, (333, 77), dtype=torch.int8, generator=g)
    param = nn.Parameter(torch.randn(5, 3, generator=g).bfloat16())
    meta = torch.empty(4, 4, device="meta")
    head = torch.empty(0).set_(big.untyped_storage()[:4000])  # another, shorter storage at big's address: first
    tensors = [head, big, half, tall, codes, param, mapped, meta]
    before = [t.clone() for t in tensors[:-1]]
    strides = [t.stride() for t in tensors[:-1]]
    storages = {t.untyped_storage().data_ptr(): max(u.untyped_storage().nbytes() for u in tensors[:-1]
                                                    if u.untyped_storage().data_ptr() == t.untyped_storage().data_ptr())
                for t in tensors[:-1]}  # 5: big's shared
    moved = into_huge_pages_(tensors)
    assert moved == sum(-(-n // 64) * 64 for n in storages.values())
    for t, b, s in zip(tensors[:-1], before, strides, strict=True):
        assert t.dtype == b.dtype and t.stride() == s and torch.equal(t, b)
    assert meta.is_meta and half.data_ptr() == big.data_ptr() + 600 * 1000 * 4 and head.data_ptr() == big.data_ptr()
    half[0, 0] = 7.0
    assert big[600, 0] == 7.0  # still a view
    assert big.data_ptr() % (2 << 20) == 0  # the first at a huge page boundary
    assert len({t.untyped_storage().data_ptr() for t in tensors[:-1]}) == 1  # one mapping
    where = huge_page_advised(big.data_ptr())
    assert where is not None and where[0] >= moved
    if "[never]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text():
        assert where[1] >= 2 << 20  # the kernel did give huge pages
    assert param.requires_grad and type(param) is nn.Parameter
    (param.float() * 2).sum().backward()
    assert torch.equal(param.grad, torch.full_like(param, 2))
    assert into_huge_pages_([meta]) == 0


def test_packed_weights_equal_reference_path(hf_tiny):
    """pack_ (fused wq|wk|wv and w1|w3, fast layout; build_role does it on CPU) computes what the unfused
    modules compute: prefill and decode logits agree and the parts are views of the packed weight. A module
    replaced after packing (here: experts quantized) runs its own path, not the stale packed weight."""
    from kernels.model import Attention, FeedForward, MoeLayer
    from kernels.quant import quantize_experts

    def unpacked(model):  # every fast path off: fused weights and moeray's C kernels (kernels/native.py)
        for m in model.modules():
            if isinstance(m, Attention | FeedForward):
                m.packed = None
            if isinstance(m, Attention | FeedForward | MoeLayer):
                m.native = None
        return model

    packed = build_role(Checkpoint.open(hf_tiny), EngineConfig(), Holds(whole=True)).model
    fused = [m for m in packed.modules() if isinstance(m, Attention | FeedForward)]
    assert fused and all(m.packed is not None for m in fused)
    attn = packed.layers[0].attention
    stack, (wq, wk) = attn.packed.weight, (attn.wq.weight, attn.wk.weight)
    assert wq.data_ptr() == stack.data_ptr() and wk.data_ptr() == stack[wq.shape[0]:].data_ptr()
    assert huge_page_advised(stack.data_ptr())
    assert huge_page_advised(packed.tok_embeddings.weight.data_ptr()) is None  # read a row a token: left as read
    fast = decode_logits(packed)
    ref = decode_logits(unpacked(build_role(Checkpoint.open(hf_tiny), EngineConfig(), Holds(whole=True)).model))
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(fast.argmax(-1), ref.argmax(-1))

    quantized = decode_logits(quantize_experts(packed, 8))
    expected = decode_logits(build_role(Checkpoint.open(hf_tiny), EngineConfig(expert_quant="int8"),
                                        Holds(whole=True)).model)
    torch.testing.assert_close(quantized, expected, atol=1e-5, rtol=1e-5)
    assert (quantized - fast).abs().max() > 1e-4  # int8 experts do change the logits: the quantized path ran


@pytest.mark.parametrize("batch", [1, 3, 16, 64])
def test_greedy_tokens_identical_at_batch_sizes(hf_tiny, batch):
    """Batches of 1 to 64 sequences, prompts 2-40 tokens, a token budget of 48 so that long prompts
    prefill in chunks while others decode, and sequences that finish early (max_tokens 8-32) leave while
    the rest go on: every greedy token equals transformers' (Mistral: window 8, the rolling buffer wraps)."""
    ps = prompts(n_list=[2 + (7 * i) % 39 for i in range(batch)], seed=batch)
    lengths = [8 + (5 * i) % 25 for i in range(batch)]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lengths]
    engine = Engine.from_dir(hf_tiny, EngineConfig(max_num_seqs=batch, max_num_batched_tokens=max(48, batch),
                                                   block_size=4))
    got = engine.generate(ps, params)
    ref = hf_model(hf_tiny)
    for p, n, r in zip(ps, lengths, got, strict=True):
        assert r.token_ids == hf_greedy(ref, p)[0][:n]


@pytest.mark.parametrize("weight_quant", ["none", "int8"])
def test_bf16_tokens_do_not_depend_on_batching(hf_mixtral, weight_quant):
    """bf16 (int8 experts; attention projections and LM head per weight_quant): each request's greedy tokens
    are the same whether the prompts are admitted all at once or one every 1 or 2 steps, i.e. whatever
    prefills and decodes of other lengths share its steps. CPU attention computes in fp32 for this
    (kernels/attention.py): with bf16 SDPA the second prompt's tokens changed with the schedule."""
    ps = prompts(n_list=(3, 8, 15, 21, 6), seed=5)
    runs = []
    for gap in (0, 1, 2):  # 0: all at once
        engine = Engine.from_dir(hf_mixtral, EngineConfig(dtype="bfloat16", expert_quant="int8",
                                                          weight_quant=weight_quant))
        pending, out, n = list(enumerate(ps)), {i: [] for i in range(len(ps))}, 0
        while pending or engine.has_unfinished():
            while pending and (gap == 0 or n % gap == 0):
                i, p = pending.pop(0)
                engine.add_request(Request(str(i), p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)))
                if gap:
                    break
            for ev in engine.step():
                out[int(ev.request_id)].append(ev.token)
            n += 1
        runs.append(out)
    assert runs[0] == runs[1] == runs[2]


def test_dtype_auto_is_the_checkpoints_precision_where_this_cpu_is_fast(hf_mixtral, tmp_path, monkeypatch):
    """engine.dtype auto (the default): an fp32 checkpoint runs in fp32; a bf16 or fp16 one in bf16 on a CPU
    with native bf16 (oneDNN's bf16 linear: kernels.packing.onednn_bf16), in fp32 on one without."""
    import shutil

    from safetensors.torch import load_file, save_file

    import kernels.build
    from kernels.build import DTYPE_CHOICES, model_dtype
    from kernels.packing import onednn_bf16
    from kernels.train import demo_dir

    half = tmp_path / "fp16"
    shutil.copytree(hf_mixtral, half)
    save_file({n: t.half() for n, t in load_file(hf_mixtral / "model.safetensors").items()},
              half / "model.safetensors")
    cpu = torch.device("cpu")
    stored = {p: Checkpoint.open(p).stored_dtype for p in (hf_mixtral, demo_dir(), half)}
    assert list(stored.values()) == [torch.float32, torch.bfloat16, torch.float16]
    fast = torch.bfloat16 if onednn_bf16() else torch.float32
    assert [model_dtype("auto", Checkpoint.open(p), cpu) for p in stored] == [torch.float32, fast, fast]
    assert model_dtype("auto", Checkpoint.open(half), torch.device("cuda")) == torch.float16  # as stored
    assert model_dtype("float32", Checkpoint.open(half), cpu) == torch.float32
    assert Engine.from_dir(demo_dir(), EngineConfig(kv_cache_tokens=64)).executor.model.dtype == fast
    assert Engine.from_dir(hf_mixtral, EngineConfig(kv_cache_tokens=64)).executor.model.dtype == torch.float32
    monkeypatch.setattr(kernels.build, "onednn_bf16", lambda: False)  # a CPU without native bf16
    assert model_dtype("auto", Checkpoint.open(demo_dir()), cpu) == torch.float32
    assert EngineConfig().dtype == "auto" and DTYPE_CHOICES == ("auto", "float32", "bfloat16", "float16")
    with pytest.raises(ValueError, match="dtype must be one of \\['auto', 'float32'"):
        EngineConfig(dtype="fp8")
