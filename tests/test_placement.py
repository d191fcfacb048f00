"""Placement: who holds which layers and experts (pure logic)."""

import pytest

from cluster.placement import PipelineConfig, place
from kernels.args import ModelArgs, MoeArgs

MIXTRAL = ModelArgs(dim=8, n_layers=4, head_dim=2, hidden_dim=8, n_heads=2, n_kv_heads=1, vocab_size=10,
                    moe=MoeArgs(8, 2))
DENSE = ModelArgs(dim=8, n_layers=4, head_dim=2, hidden_dim=8, n_heads=2, n_kv_heads=1, vocab_size=10)


def cfg(attention=1, shards=1, replicas=1):
    c = PipelineConfig()
    c.attention.actors, c.experts.shards, c.experts.replicas = attention, shards, replicas
    return c


@pytest.mark.parametrize("shards", [1, 2, 4, 8])
def test_experts_split_whole_experts_across_layers(shards):
    p = place(MIXTRAL, cfg(shards=shards))
    for s, pairs in enumerate(p.shards):
        assert {e for _, e in pairs} == set(range(s * 8 // shards, (s + 1) * 8 // shards))
        assert {l for l, _ in pairs} == {0, 1, 2, 3}
    assert sorted(x for pairs in p.shards for x in pairs) == [(l, e) for l in range(4) for e in range(8)]


def test_dense_splits_by_layer_and_attention_splits_contiguously():
    p = place(DENSE, cfg(attention=3, shards=2))
    assert p.attention == [[0], [1], [2, 3]]
    assert p.shards == [[(0, 0), (1, 0)], [(2, 0), (3, 0)]]


def test_replicas_map_each_pair_to_its_actors():
    p = place(MIXTRAL, cfg(shards=2, replicas=3))
    actors = p.actors_of()
    assert actors[(0, 0)] == [0, 1, 2] and actors[(3, 7)] == [3, 4, 5]


@pytest.mark.parametrize("kw, message", [(dict(attention=5), "attention.actors"), (dict(shards=33), "experts.shards"),
                                         (dict(replicas=0), "replicas")])
def test_impossible_layouts_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        place(MIXTRAL, cfg(**kw))
