"""Token trees: every distinct prefix once, each sequence recoverable from its path, limits respected."""

from __future__ import annotations

from llmlab_fixtures.providers.transformers.token_tree import PackedTree, pack_tree


def unpack(tree: PackedTree, i: int) -> list[int]:
    return [tree.tokens[node] for node in tree.paths[i]]


def distinct_prefixes(sequences: list[list[int]]) -> int:
    return len({tuple(s[: n + 1]) for s in sequences for n in range(len(s))})


def test_each_distinct_prefix_is_one_node_and_paths_give_back_the_sequences() -> None:
    sequences = [[5, 6, 7, 8], [5, 6, 7, 9, 10], [5, 6, 7, 9, 10], [5, 11], [12, 6, 7]]
    keep = [1, 2, 2, 1, 3]
    tree = pack_tree(sequences, keep, 0, max_nodes=100, max_kept=100)
    assert tree.count == len(sequences)
    assert len(tree.tokens) == distinct_prefixes(sequences) == 10
    assert [unpack(tree, i) for i in range(tree.count)] == sequences
    assert tree.new_nodes == [4, 2, 0, 1, 3]  # the repeated sequence adds nothing
    for node, (parent, depth) in enumerate(zip(tree.parents, tree.depths)):
        assert parent < node  # parents come first
        assert depth == (0 if parent < 0 else tree.depths[parent] + 1)
    for path in tree.paths:  # a token's ancestors are exactly the tokens before it in its sequence
        for depth, node in enumerate(path):
            assert tree.parents[node] == (path[depth - 1] if depth else -1)
    read = [[tree.tokens[node] for node in tree.kept if node in path] for path in tree.paths]
    assert read == [s[len(s) - k :] for s, k in zip(sequences, keep)]  # the last keep[i] tokens of each, no more


def test_packing_stops_at_each_limit_but_always_takes_one_sequence() -> None:
    sequences = [[1, 2, 3], [1, 2, 4], [1, 5, 6], [7, 8, 9]]
    keep = [1, 1, 2, 3]
    assert pack_tree(sequences, keep, 0, max_nodes=5, max_kept=100).count == 2  # 3 + 1 nodes; the third adds 2
    assert pack_tree(sequences, keep, 0, max_nodes=6, max_kept=100).count == 3
    assert pack_tree(sequences, keep, 0, max_nodes=100, max_kept=3).count == 2  # the third reads two more
    assert pack_tree(sequences, keep, 0, max_nodes=100, max_kept=100, max_sequences=1).count == 1
    alone = pack_tree(sequences, keep, 3, max_nodes=1, max_kept=1)  # too big for the limits, packed anyway
    assert (alone.first, alone.count, unpack(alone, 0), alone.kept) == (3, 1, [7, 8, 9], [0, 1, 2])


def test_consecutive_packs_cover_every_sequence_once() -> None:
    sequences = [[i % 3, i % 5, i] for i in range(40)]
    sequences.sort()
    first, covered = 0, []
    while first < len(sequences):
        tree = pack_tree(sequences, [1] * len(sequences), first, max_nodes=16, max_kept=100)
        assert len(tree.tokens) <= 16
        covered += [unpack(tree, i) for i in range(tree.count)]
        first += tree.count
    assert covered == sequences
