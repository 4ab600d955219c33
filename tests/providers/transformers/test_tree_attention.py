"""Block-sparse tree attention gives what one SDPA pass with the tree mask gives; it is used where it saves work."""

from __future__ import annotations

import random

import pytest

from llmlab_fixtures.providers.transformers.token_tree import pack_tree
from llmlab_fixtures.providers.transformers.tree_attention import blocked_attention, plan_blocks, tree_mask

torch = pytest.importorskip("torch")
F = pytest.importorskip("torch.nn.functional")

HEADS, KV_HEADS, DIM = 9, 3, 64  # SmolLM2's grouped-query attention


def items_as_sequences(n_items: int, seed: int = 0, long_every: int = 0) -> list[list[int]]:
    """Multiple-choice items as sequences: a context of 10-40 tokens (every ``long_every``-th 100-140, as MMLU's
    long questions), then four choices of 1-8 tokens (two of them sharing their first token); sorted, as the backend
    packs them."""
    rng = random.Random(seed)
    sequences = []
    for item in range(n_items):
        long = long_every and item % long_every == 0
        context = [rng.randrange(1, 1000) for _ in range(rng.randint(100, 140) if long else rng.randint(10, 40))]
        first = rng.randrange(1, 1000)
        for choice in range(4):
            tail = [rng.randrange(1, 1000) for _ in range(rng.randint(1, 8))]
            sequences.append(context + ([first] if choice < 2 else []) + tail)
    return sorted(sequences)


def packed(n_items: int, max_nodes: int = 512, long_every: int = 0):
    sequences = items_as_sequences(n_items, long_every=long_every)
    return pack_tree(sequences, [len(s) // 2 for s in sequences], 0, max_nodes=max_nodes, max_kept=10_000)


@pytest.mark.parametrize("prefix_apart", [True, False], ids=["prefix-apart", "prefix-in-every-block"])
@pytest.mark.parametrize("shared", [0, 37])
@pytest.mark.parametrize("long_every", [0, 4], ids=["short-items", "some-long-items"])
def test_blocked_attention_matches_one_masked_pass(shared: int, prefix_apart: bool, long_every: int) -> None:
    tree = packed(16, max_nodes=1536, long_every=long_every)
    n = len(tree.tokens)
    allowed = tree_mask(tree, shared)
    blocks = plan_blocks(tree, allowed, shared, prefix_apart=prefix_apart)
    assert blocks is not None and sum(batch.queries.shape[0] for batch in blocks.batches) >= 4
    nodes = torch.cat([batch.nodes for batch in blocks.batches]).tolist()
    assert sorted(nodes) == list(range(n))  # every node is a query once
    gen = torch.Generator().manual_seed(shared)
    query = torch.randn(1, HEADS, n, DIM, generator=gen)
    key = torch.randn(1, KV_HEADS, shared + n, DIM, generator=gen)
    value = torch.randn(1, KV_HEADS, shared + n, DIM, generator=gen)
    dense = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed[None, None], scale=0.125,
                                           enable_gqa=True).transpose(1, 2)
    got = blocked_attention(query, key, value, blocks, 0.125)
    assert got.shape == dense.shape == (1, n, HEADS, DIM)
    torch.testing.assert_close(got, dense, atol=1e-5, rtol=1e-5)


def test_the_prefix_apart_keeps_half_precision_within_its_rounding() -> None:
    """bf16 queries and keys (a model loaded with --dtype bfloat16): the parts are joined in fp32, so the result is
    as close to fp32 dense attention as bf16 dense attention is."""
    tree, shared = packed(16), 37
    n = len(tree.tokens)
    allowed = tree_mask(tree, shared)
    blocks = plan_blocks(tree, allowed, shared, prefix_apart=True)
    gen = torch.Generator().manual_seed(1)
    query, key, value = (torch.randn(1, heads, rows, DIM, generator=gen) for heads, rows in
                         ((HEADS, n), (KV_HEADS, shared + n), (KV_HEADS, shared + n)))
    exact = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed[None, None], scale=0.125,
                                           enable_gqa=True).transpose(1, 2)
    half = [t.bfloat16() for t in (query, key, value)]
    dense = F.scaled_dot_product_attention(*half, attn_mask=allowed[None, None], scale=0.125,
                                           enable_gqa=True).transpose(1, 2)
    got = blocked_attention(*half, blocks, 0.125)
    assert got.dtype == torch.bfloat16
    assert (got.float() - exact).abs().max() <= 2 * (dense.float() - exact).abs().max()


def test_a_node_attends_to_its_ancestors_only() -> None:
    tree = pack_tree([[1, 2, 3], [1, 2, 4], [5, 6]], [1, 1, 1], 0, max_nodes=99, max_kept=99)
    assert tree_mask(tree, 2).int().tolist() == [
        [1, 1, 1, 0, 0, 0, 0, 0],  # 1
        [1, 1, 1, 1, 0, 0, 0, 0],  # 1 2
        [1, 1, 1, 1, 1, 0, 0, 0],  # 1 2 3
        [1, 1, 1, 1, 0, 1, 0, 0],  # 1 2 4
        [1, 1, 0, 0, 0, 0, 1, 0],  # 5
        [1, 1, 0, 0, 0, 0, 1, 1],  # 5 6
    ]


def test_blocks_are_planned_only_where_they_save_work() -> None:
    one_item = packed(1)
    assert plan_blocks(one_item, tree_mask(one_item, 0), 0) is None  # a single block is dense attention again
    tree = packed(16)
    assert plan_blocks(tree, tree_mask(tree, 0), 0) is not None
    long_prefix = tree_mask(tree, 4000)
    assert plan_blocks(tree, long_prefix, 4000, prefix_apart=False) is None  # every block would re-read it
    assert plan_blocks(tree, long_prefix, 4000, prefix_apart=True) is not None  # read once, in a pass of its own


def test_long_items_are_batched_apart_from_short_ones() -> None:
    """A few long items do not pad every short block to their size: blocks go in batches of similar size."""
    tree = packed(16, max_nodes=1536, long_every=4)
    blocks = plan_blocks(tree, tree_mask(tree, 0), 0, prefix_apart=True)
    assert blocks is not None and len(blocks.batches) >= 2
    padded = sum(batch.queries.numel() for batch in blocks.batches)
    one_size = sum(batch.queries.shape[0] for batch in blocks.batches) * max(
        batch.queries.shape[1] for batch in blocks.batches)
    assert padded < 0.8 * one_size
