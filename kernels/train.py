"""Trains moeray's built-in demo model: a tiny Mixtral (8 experts, top-2, GQA, RoPE) that learns
kernels/assets/corpus.txt by heart, so `moeray serve` with no arguments chats in readable English.

    python -m kernels.train --out kernels/assets/demo [--steps 1200] [--seed 0]

Why this way:
- It trains OUR Transformer (kernels/model.py) through the serving path itself (paged attention,
  route -> dispatch -> experts -> combine), so the shipped weights are exactly what our code computes.
- Memorizing is the goal, not a risk: 50 KB of text cannot teach English, but a model that recites
  it fluently makes a demo whose answers a newcomer can read and check against the corpus.
- Dialogues are trained twice: as plain text and in the Mixtral v1 chat template, so a chat request
  (`encode_chat`) gets a corpus answer that ends with EOS, as a real instruct model's would; answers
  also follow prompts made fresh each epoch, so unseen questions get a whole answer (see Corpus).
- A Switch-style load-balancing loss keeps all eight experts busy: it is the demo of an MoE server.
Pure torch, one process, ~6 minutes on 2 CPU cores; the same seed and thread count give the same bytes.
Shapes: T tokens of a batch, D dim, E experts, k experts per token.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.args import ModelArgs, MoeArgs
from kernels.cache import KVCache, StepSeq
from kernels.checkpoint import save_hf
from kernels.model import MoeLayer, Step, Transformer, TransformerBlock
from kernels.tokenizer import Tokenizer, default_corpus, train_tokenizer

DEMO_DIR = Path(__file__).parent / "assets" / "demo"
DEMO_VOCAB = 1024
BLOCK = 16  # KV-cache block size used while training (any value works: every sequence starts at 0)


def demo_dir() -> Path:
    """The shipped demo checkpoint, or a FileNotFoundError that says how to rebuild it."""
    if not all((DEMO_DIR / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.model")):
        raise FileNotFoundError(f"the built-in demo model is missing from {DEMO_DIR}; "
                                f"rebuild it with `python -m kernels.train --out {DEMO_DIR}`")
    return DEMO_DIR


def demo_args(vocab_size: int = DEMO_VOCAB, **overrides) -> ModelArgs:
    """Mixtral's shape (GQA 2:1, 8 experts top-2, RoPE 1e6) scaled down to train in minutes on 2 cores
    and ship in ~4 MB as bf16: the experts dominate, so their hidden size is dim, not Mixtral's 3.5 x dim."""
    base = dict(dim=128, n_layers=4, head_dim=32, hidden_dim=128, n_heads=4, n_kv_heads=2,
                vocab_size=vocab_size, rope_theta=1e6, max_seq_len=512, moe=MoeArgs(8, 2))
    return ModelArgs(**{**base, **overrides})


class Corpus:
    """The training text as token sequences, a fresh mix each epoch.

    Fixed: every paragraph as BOS ... EOS; every dialogue in the chat template, whole, and its later
    turns on their own too (so any corpus question works as a first message). Fresh each epoch, per
    answer: its question with words left out, and a stranger prompt (a corpus sentence, or a question
    of random corpus words). Seeing an answer after many prompts it cannot memorize teaches the model
    to recite an answer from the answer's own start, so a question the corpus lacks gets one whole,
    fluent corpus answer instead of a blend of several.
    """

    def __init__(self, text: str, tok: Tokenizer):
        self.tok, self.fixed, self.pairs = tok, [], []
        paras = [p.strip() for p in text.split("\n\n") if p.strip()]
        for para in paras:
            self.fixed.append(tok.encode(para, bos=True, eos=True))
            if para.startswith("User: "):
                turns = [line.split(": ", 1)[1] for line in para.splitlines()]  # user, assistant, user, ...
                msgs = [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
                self.fixed.append(tok.encode_chat(msgs[:-1]) + tok.encode(turns[-1], bos=False, eos=True))
                self.fixed += [self.chat(turns[i], turns[i + 1]) for i in range(2, len(turns), 2)]
                self.pairs += [(turns[i], turns[i + 1]) for i in range(0, len(turns), 2)]
        self.prose = [s for p in paras if not p.startswith("User: ") for s in re.split(r"(?<=[.!?]) ", p)]
        self.words = sorted(set(re.findall(r"\b[a-z]+\b", text)))

    def chat(self, question: str, answer: str) -> list[int]:
        prompt = self.tok.encode_chat([{"role": "user", "content": question}])
        return prompt + self.tok.encode(answer, bos=False, eos=True)

    def epoch(self, g: torch.Generator) -> list[list[int]]:
        def pick(seq):
            return seq[int(torch.randint(len(seq), (1,), generator=g))]
        out = list(self.fixed)
        for question, answer in self.pairs:
            words = question.split()
            draws = torch.rand(len(words), generator=g).tolist()
            kept = [w for w, r in zip(words, draws, strict=True) if r > 0.3] or words[-1:]
            soup = pick(self.pairs)[0].split()[:2] + [pick(self.words) for _ in range(pick(range(1, 6)))]
            stranger = pick([pick(self.prose), " ".join(soup) + "?"])
            out += [self.chat(" ".join(kept), answer), self.chat(stranger, answer)]
        return out


def batches(corpus: Corpus, max_tokens: int, g: torch.Generator):
    """Endless epochs: a fresh mix, shuffled, packed as whole sequences into batches of <= max_tokens."""
    while True:
        seqs, n = corpus.epoch(g), 0
        batch: list[list[int]] = []
        for i in torch.randperm(len(seqs), generator=g).tolist():
            if batch and n + len(seqs[i]) > max_tokens:
                yield batch
                batch, n = [], 0
            batch.append(seqs[i])
            n += len(seqs[i])
        yield batch


def routing(x: torch.Tensor, moe: MoeLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """Router probabilities [T, E] of a MoE layer's inputs x [T, D], and each expert's share of rows [E]."""
    probs = F.linear(x, moe.gate.weight).float().softmax(-1)  # [T, E]
    chosen = probs.topk(moe.k, dim=-1).indices  # [T, k]: the experts route() picks
    return probs, F.one_hot(chosen, probs.shape[1]).float().sum(1).mean(0) / moe.k


def balance_loss(gate_inputs: list[torch.Tensor], moes: list[MoeLayer]) -> torch.Tensor:
    """Switch Transformer's E * sum_e share_e * mean_prob_e, averaged over layers: 1 when perfectly even.
    gate_inputs[i] is the input of moes[i]."""
    losses = []
    for x, moe in zip(gate_inputs, moes, strict=True):
        probs, share = routing(x, moe)
        losses.append(probs.shape[1] * (share * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def lm_loss(model: Transformer, batch: list[list[int]]) -> torch.Tensor:
    """Next-token cross entropy over all tokens of B whole sequences, in one flat forward pass."""
    a = model.args
    inputs = [torch.tensor(s[:-1]) for s in batch]
    targets = torch.cat([torch.tensor(s[1:]) for s in batch])  # [T]
    blocks = [-(-len(x) // BLOCK) for x in inputs]
    starts = [sum(blocks[:i]) for i in range(len(blocks))]
    seqs = [StepSeq(list(range(s, s + b)), 0, len(x)) for s, b, x in zip(starts, blocks, inputs, strict=True)]
    cache = KVCache(a.n_layers, sum(blocks), BLOCK, a.n_kv_heads, a.head_dim)  # fresh: nothing cached
    logits = model(torch.cat(inputs), Step.begin(seqs, a, cache), torch.arange(len(targets)))  # [T, V]
    return F.cross_entropy(logits, targets)


def train(out: str | Path, steps: int = 1200, seed: int = 0, args: ModelArgs | None = None, lr: float = 3e-3,
          batch_tokens: int = 4096, balance: float = 0.01, log_every: int = 50, text: str | None = None) -> dict:
    """Trains on `text` (the shipped corpus by default) and writes a HF checkpoint dir; returns a summary."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng():  # leave the caller's RNG and settings as they were
            return _train(Path(out), steps, seed, args, lr, batch_tokens, balance, log_every, text)
    finally:
        torch.use_deterministic_algorithms(was)


def _train(out, steps, seed, args, lr, batch_tokens, balance, log_every, text) -> dict:
    t0 = time.time()
    torch.manual_seed(seed)
    text = default_corpus() if text is None else text
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(train_tokenizer(text, out / "tokenizer.model", vocab_size=DEMO_VOCAB))
    args = args or demo_args(tok.vocab_size)
    corpus = Corpus(text, tok)
    model = Transformer(args).train()
    moes = [m for b in model.layers if isinstance(m := b.feed_forward, MoeLayer)]  # one per layer, in layer order
    gate_inputs: list[torch.Tensor] = []  # each forward's MoE layer inputs (ffn_norm's outputs), in moes' order
    for b in model.layers:
        if isinstance(b, TransformerBlock) and isinstance(b.feed_forward, MoeLayer):
            b.ffn_norm.register_forward_hook(lambda _, inp, out: gate_inputs.append(out))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 20)  # linear warmup, then cosine down to a tenth of lr
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.1 + 0.45 * (1 + math.cos(math.pi * s / steps))))
    losses = []
    # batches() is endless: the range ends the loop
    for step, batch in zip(range(1, steps + 1), batches(corpus, batch_tokens, torch.Generator().manual_seed(seed)),
                           strict=False):
        gate_inputs.clear()
        loss = lm_loss(model, batch)
        total = loss + balance * balance_loss(gate_inputs, moes)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % log_every == 0 or step in (1, steps):
            print(f"step {step}/{steps} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e} "
                  f"{time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    with torch.no_grad():  # rows per expert in the last batch, per layer: 1/8 each would be perfectly even
        load = [routing(x, moe)[1] for x, moe in zip(gate_inputs, moes, strict=True)]
    params = {n: p.detach().to(torch.bfloat16) for n, p in model.state_dict().items()}
    save_hf(out, args, params)
    summary = dict(out=out, steps=steps, seed=seed, first_loss=losses[0],
                   final_loss=sum(losses[-20:]) / len(losses[-20:]),
                   params=sum(p.numel() for p in model.parameters()), seconds=round(time.time() - t0, 1),
                   examples=len(corpus.fixed) + 2 * len(corpus.pairs),
                   tokens=sum(map(len, corpus.epoch(torch.Generator()))),
                   load=[f"{x.min():.0%}-{x.max():.0%}" for x in load])
    (out / "TRAINING.md").write_text(_report(summary))
    print(f"wrote {out}: loss {summary['final_loss']:.3f}, {summary['seconds']} s", file=sys.stderr)
    return summary | {"losses": losses}


def _report(s: dict) -> str:
    return "\n".join([
        "# How this checkpoint was trained", "",
        f"    python -m kernels.train --out {s['out']} --steps {s['steps']} --seed {s['seed']}", "",
        f"- Model: Mixtral architecture, {s['params']:,} parameters (config.json), stored as bf16.",
        f"- Data: kernels/assets/corpus.txt as {s['examples']} sequences, {s['tokens']:,} tokens an epoch: "
        "paragraphs BOS..EOS; dialogues also in the Mixtral v1 chat template; each answer after two prompts "
        "made fresh each epoch.",
        f"- {s['steps']} steps of AdamW, warmup then cosine; loss {s['first_loss']:.3f} -> {s['final_loss']:.3f} "
        f"(mean of the last 20 steps); {s['seconds']} s on {torch.get_num_threads()} CPU threads, "
        f"torch {torch.__version__}.",
        f"- Expert load (share of a layer's rows per expert, least-most, last batch): {', '.join(s['load'])}.",
        "- The model has learned the corpus by heart on purpose: it is a demo, not a language model.", ""])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    return train(a.out, steps=a.steps, seed=a.seed)


if __name__ == "__main__":
    main()
