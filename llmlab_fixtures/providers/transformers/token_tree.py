"""Token trees: sequences that share prefixes, packed into one sequence that holds every distinct prefix once.

Scoring an item's choices (or several items after a shared few-shot block) runs the same leading tokens many
times. Packed as a tree, each distinct prefix is one node; a token attends to its ancestors only and sits at its
depth's position, so every sequence's logits come out as if it had run alone, and the tokens evaluated are the
number of distinct prefixes. This module builds the tree; the backend turns it into ids, positions and a mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class PackedTree:
    """Sequences ``first .. first + count - 1`` of a list, packed: nodes are in order, parents before children."""

    first: int
    tokens: list[int] = field(default_factory=list)  # one per node
    parents: list[int] = field(default_factory=list)  # each node's parent node, -1 for a first token
    depths: list[int] = field(default_factory=list)  # each node's position within its sequences (0-based)
    paths: list[list[int]] = field(default_factory=list)  # per packed sequence: the node of each of its tokens
    new_nodes: list[int] = field(default_factory=list)  # per packed sequence: nodes it added (its tokens evaluated)
    kept: list[int] = field(default_factory=list)  # nodes whose logits are read, ascending

    @property
    def count(self) -> int:
        """How many sequences are packed."""
        return len(self.paths)


def pack_tree(sequences: Sequence[Sequence[int]], keep: Sequence[int], first: int, *, max_nodes: int,
              max_kept: int, max_sequences: int | None = None) -> PackedTree:
    """Pack ``sequences[first:]`` in order while the tree stays within ``max_nodes`` nodes, ``max_kept`` read
    positions (the last ``keep[i]`` tokens of sequence i) and ``max_sequences``; at least one sequence is packed.

    Sequences sorted by their tokens put shared prefixes side by side, so the greedy fill wastes nothing.
    """
    tree = PackedTree(first)
    children: dict[tuple[int, int], int] = {}
    kept: set[int] = set()
    for index in range(first, len(sequences)):
        if max_sequences is not None and tree.count >= max_sequences:
            break
        tokens = sequences[index]
        path: list[int] = []
        fresh: list[tuple[int, int, int]] = []  # (parent, token, depth) of nodes this sequence would add
        parent = -1
        for depth, token in enumerate(tokens):
            node = children.get((parent, token)) if not fresh else None
            if node is None:
                node = len(tree.tokens) + len(fresh)
                fresh.append((parent, token, depth))
            path.append(node)
            parent = node
        wanted = kept.union(path[len(path) - keep[index]:])
        if tree.count and (len(tree.tokens) + len(fresh) > max_nodes or len(wanted) > max_kept):
            break
        for parent, token, depth in fresh:
            children[(parent, token)] = len(tree.tokens)
            tree.tokens.append(token)
            tree.parents.append(parent)
            tree.depths.append(depth)
        kept = wanted
        tree.paths.append(path)
        tree.new_nodes.append(len(fresh))
    tree.kept = sorted(kept)
    return tree
