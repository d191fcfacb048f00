"""KV-cache blocks: which block of the cache holds what, for whom, and what full blocks hold (prefix caching).

The KV cache is one pool of `num_blocks` blocks of `block_size` token slots (kernels/cache.py holds the
tensors); a sequence's block table lists the blocks holding its tokens, in order. BlockPool hands blocks
out and takes them back. With prefix caching, a full block is also named by what it holds: a hash of its
tokens and of the name of the block before it (so of every token before it, from position 0), and a
sequence whose first k full blocks of tokens have names the pool knows takes those blocks instead of
computing them. Blocks are reference-counted; a named block no sequence holds keeps its contents on an LRU
list, counted as free, until a new block is needed and none is free otherwise (then the least recently
released is reused and forgets its name).

A block is named only once full and computed (after the step that wrote its last slot), and names are only
ever matched from position 0, so a shared block is never written again: the sequences sharing it write
only after it. (A sliding-window model's rolling buffer overwrites its blocks: the engine does not name
them.)
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque


class CacheFull(RuntimeError):
    pass


def block_names(tokens: list[int], block_size: int, names: list[bytes]) -> list[bytes]:
    """`names` (of the first full blocks of `tokens`) extended with the names of its other full blocks.
    A name is a 16-byte BLAKE2b digest of the previous name and the block's token ids: equal names mean
    equal tokens from position 0 (no cheap collision: a client cannot forge another's prefix)."""
    out = list(names)
    for i in range(len(out), len(tokens) // block_size):
        block = array("q", tokens[i * block_size : (i + 1) * block_size]).tobytes()
        out.append(hashlib.blake2b((out[-1] if out else b"") + block, digest_size=16).digest())
    return out


class BlockPool:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))  # hold nothing anyone may want
        self._cached: OrderedDict[int, None] = OrderedDict()  # unreferenced named blocks, least recently released first
        self._refs = [0] * num_blocks
        self._name_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        """Blocks `allocate` can hand out: free ones and unreferenced cached ones."""
        return len(self._free) + len(self._cached)

    def allocate(self, n: int) -> list[int]:
        """n blocks, each referenced once: free ones first, then the least recently released cached ones."""
        if n > self.num_free:
            raise CacheFull(f"need {n} KV blocks, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:
                b, _ = self._cached.popitem(last=False)
                del self._block_of[self._name_of.pop(b)]
            self._refs[b] = 1
            out.append(b)
        return out

    def free(self, blocks: list[int]) -> None:
        """Drops one reference to each block. A sequence's last blocks are released first, so under memory
        pressure its tail is reused before its head (which more requests share)."""
        for b in reversed(blocks):
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if b in self._name_of:
                    self._cached[b] = None
                else:
                    self._free.append(b)

    def lookup(self, names: list[bytes]) -> list[int]:
        """The blocks holding the longest prefix of `names` (nothing is taken)."""
        out = []
        for name in names:
            b = self._block_of.get(name)
            if b is None:
                break
            out.append(b)
        return out

    def unreferenced(self, blocks: list[int]) -> int:
        """How many of `blocks` are cached and held by no one (taking them uses up free blocks)."""
        return sum(1 for b in blocks if self._refs[b] == 0)

    def take(self, blocks: list[int]) -> None:
        """One more reference to each of `blocks` (found by lookup)."""
        for b in blocks:
            if self._refs[b] == 0:
                del self._cached[b]
            self._refs[b] += 1

    def name(self, block: int, name: bytes) -> None:
        """`block` is full and computed, holding what `name` says (ignored when another block has that name)."""
        if name not in self._block_of and block not in self._name_of:
            self._block_of[name] = block
            self._name_of[block] = name

    def forget(self) -> None:
        """The cache's contents are gone (an executor lost its KV state): no block holds anything known now."""
        self._block_of.clear()
        self._name_of.clear()
        self._free.extend(self._cached)
        self._cached.clear()
