"""Block-sparse attention for a packed token tree: each block of nodes attends only to the keys it may see.

A packed tree (``token_tree.pack_tree``) is one forward pass whose tokens attend through a mask to the cached prefix
and their own ancestors. SDPA with that mask scores every token against every key of the pass and the prefix,
although a token sees only its item's few dozen nodes: on a CPU that dense attention is about a fifth of a 512-token
pass. Here the packed sequences are cut into blocks of consecutive sequences of about ``BLOCK_QUERIES`` new nodes;
a block's queries are the nodes its sequences added, its keys the cached prefix plus every node on their paths.
The blocks go through SDPA as one batch, padded to the longest block, and the outputs are put back in node order.
Each token still attends to exactly the keys the mask allows, so the outputs match dense attention to rounding.

``install_tree_attention()`` wraps transformers' ``sdpa`` attention function (for every model in the process): a
pass given a ``TreeBlocks`` as ``llmlab_tree_blocks`` takes this path, every other call goes to SDPA unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmlab_fixtures.providers.token_tree import PackedTree

BLOCK_QUERIES = 64  # nodes a block adds (a block of several short items, or one long item)
TREE_BLOCKS_KWARG = "llmlab_tree_blocks"


@dataclass
class TreeBlocks:
    """Where each block's queries and keys sit: ``queries`` [blocks, Q] and ``keys`` [blocks, K] are node indices
    (padding repeats a real node), ``query_valid`` marks real queries, ``mask`` [blocks, 1, Q, shared + K] the keys
    each query may attend to (the ``shared`` cached prefix first)."""

    shared: int
    queries: Any
    query_valid: Any
    keys: Any
    mask: Any

    def to(self, device: Any) -> TreeBlocks:
        """The same blocks with their tensors on ``device``."""
        return TreeBlocks(self.shared, self.queries.to(device), self.query_valid.to(device), self.keys.to(device),
                          self.mask.to(device))


@dataclass
class _Group:
    """Consecutive packed sequences that form one block: the nodes they added and every node on their paths."""

    first: int
    end: int
    keys: set[int] = field(default_factory=set)


def tree_mask(tree: PackedTree, shared: int) -> Any:
    """Which keys each node may attend to, as a boolean [nodes, shared + nodes] tensor: the ``shared`` cached
    prefix, its ancestors and itself."""
    import torch

    n = len(tree.tokens)
    allowed = torch.zeros((n, shared + n), dtype=torch.bool)
    allowed[:, :shared] = True
    for node, parent in enumerate(tree.parents):
        if parent >= 0:
            allowed[node] = allowed[parent]
        allowed[node, shared + node] = True
    return allowed


def plan_blocks(tree: PackedTree, allowed: Any, shared: int, *,
                block_queries: int = BLOCK_QUERIES) -> TreeBlocks | None:
    """Blocks for ``tree`` whose boolean mask over [cached prefix, tree nodes] is ``allowed`` [nodes, shared +
    nodes]; None when blocks would not do less work than dense attention (one block, or a long cached prefix
    that every block has to read again)."""
    import torch

    groups: list[_Group] = []
    node = 0
    for path, added in zip(tree.paths, tree.new_nodes):
        if not groups or node + added - groups[-1].first > block_queries:
            groups.append(_Group(node, node))
        node += added
        groups[-1].end = node
        groups[-1].keys.update(path)
    n = len(tree.tokens)
    n_queries = max(g.end - g.first for g in groups)
    n_keys = max(len(g.keys) for g in groups)
    if len(groups) < 2 or 2 * len(groups) * n_queries * (shared + n_keys) > n * (shared + n):
        return None
    queries = torch.zeros((len(groups), n_queries), dtype=torch.long)
    query_valid = torch.zeros((len(groups), n_queries), dtype=torch.bool)
    keys = torch.zeros((len(groups), n_keys), dtype=torch.long)
    key_valid = torch.zeros((len(groups), n_keys), dtype=torch.bool)
    for b, group in enumerate(groups):
        first, size = group.first, group.end - group.first
        queries[b, :size] = torch.arange(first, group.end)
        queries[b, size:] = first
        query_valid[b, :size] = True
        ordered = sorted(group.keys)
        keys[b, : len(ordered)] = torch.tensor(ordered)
        keys[b, len(ordered) :] = ordered[0]
        key_valid[b, : len(ordered)] = True
    rows = allowed[queries]  # [blocks, Q, shared + nodes]
    tree_part = torch.gather(rows[..., shared:], 2, keys[:, None, :].expand(-1, n_queries, -1))
    mask = torch.cat([rows[..., :shared], tree_part & key_valid[:, None, :]], dim=2)
    return TreeBlocks(shared, queries, query_valid, keys, mask[:, None])


def blocked_attention(query: Any, key: Any, value: Any, blocks: TreeBlocks, scaling: float | None) -> Any:
    """Attention of a batch-1 pass over a packed tree: ``query`` [1, heads, nodes, dim], ``key``/``value``
    [1, kv heads, shared + nodes, dim]; returns [1, nodes, heads, dim] as transformers' attention functions do."""
    import torch
    import torch.nn.functional as F

    shared = blocks.shared
    n_blocks = blocks.queries.shape[0]
    q = query[0][:, blocks.queries].transpose(0, 1)  # [blocks, heads, Q, dim]
    k = key[0][:, shared:][:, blocks.keys].transpose(0, 1)  # [blocks, kv heads, K, dim]
    v = value[0][:, shared:][:, blocks.keys].transpose(0, 1)
    if shared:
        k = torch.cat([key[0][:, :shared].expand(n_blocks, -1, -1, -1), k], dim=2)
        v = torch.cat([value[0][:, :shared].expand(n_blocks, -1, -1, -1), v], dim=2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=blocks.mask, scale=scaling,
                                         enable_gqa=q.shape[1] != k.shape[1])  # [blocks, heads, Q, dim]
    result = query.new_empty((query.shape[2], query.shape[1], query.shape[3]))  # [nodes, heads, dim]
    result[blocks.queries[blocks.query_valid]] = out.transpose(1, 2)[blocks.query_valid]
    return result[None]


def install_tree_attention() -> None:
    """Route transformers' ``sdpa`` attention through ``blocked_attention`` when a pass carries tree blocks."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if getattr(sdpa, "tree_blocks", False):
        return

    def sdpa_or_tree_blocks(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                            *args: Any, **kwargs: Any) -> tuple[Any, None]:
        blocks = kwargs.pop(TREE_BLOCKS_KWARG, None)
        if blocks is None:
            return sdpa(module, query, key, value, attention_mask, *args, **kwargs)
        return blocked_attention(query, key, value, blocks, kwargs.get("scaling")), None

    sdpa_or_tree_blocks.tree_blocks = True  # type: ignore[attr-defined]
    ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa_or_tree_blocks
