"""Block-sparse attention for a packed token tree: each block of nodes attends only to the keys it may see.

A packed tree (``token_tree.pack_tree``) is one forward pass whose tokens attend through a mask to the cached prefix
and their own ancestors. SDPA with that mask scores every token against every key of the pass and the prefix,
although a token sees only its item's few dozen nodes: on a CPU that dense attention is about a fifth of a 512-token
pass. Here the packed sequences are cut into blocks of consecutive sequences of about ``BLOCK_QUERIES`` new nodes;
a block's queries are the nodes its sequences added, its keys every node on their paths. The blocks go through
attention as one batch, padded to the longest block, and the outputs are put back in node order.

The cached prefix every node sees is attended one of two ways. On a CPU, apart: one unmasked pass of all nodes over
the prefix, joined to the blocks' outputs by each query's log-sum-exp (torch's CPU flash kernel returns it), so the
prefix is read once a layer and the cost of a node does not grow with the size of its tree. Elsewhere, copied in
front of every block's keys, in one SDPA call. Each token attends to exactly the keys the mask allows either way,
so the outputs match dense attention to rounding.

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
    (padding repeats a real node), ``query_valid`` marks real queries, ``mask`` the keys each query may attend to:
    [blocks, 1, Q, K] over the tree keys where ``prefix_apart`` (every query attends to all of the ``shared`` cached
    prefix in a pass of its own), else [blocks, 1, Q, shared + K] with the prefix, copied into every block, first."""

    shared: int
    queries: Any
    query_valid: Any
    keys: Any
    mask: Any
    prefix_apart: bool = False
    _bias: dict[Any, Any] = field(default_factory=dict, repr=False)

    def to(self, device: Any) -> TreeBlocks:
        """The same blocks with their tensors on ``device``."""
        return TreeBlocks(self.shared, self.queries.to(device), self.query_valid.to(device), self.keys.to(device),
                          self.mask.to(device), self.prefix_apart)

    def bias(self, dtype: Any, groups: int) -> Any:
        """The mask as scores to add (0 or -inf) in ``dtype``, repeated for ``groups`` query heads stacked per key
        head: [blocks, 1, groups x Q, K]; made once a pass, read by every layer."""
        import torch

        if (dtype, groups) not in self._bias:
            mask = self.mask.repeat(1, 1, groups, 1)
            self._bias[dtype, groups] = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
                ~mask, float("-inf"))
        return self._bias[dtype, groups]


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


def plan_blocks(tree: PackedTree, allowed: Any, shared: int, *, block_queries: int = BLOCK_QUERIES,
                prefix_apart: bool = False) -> TreeBlocks | None:
    """Blocks for ``tree`` whose boolean mask over [cached prefix, tree nodes] is ``allowed`` [nodes, shared +
    nodes], the prefix attended apart (CPU only) or in every block; None when blocks would not do less work than
    dense attention (one block, or a long cached prefix that every block would read again)."""
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
    per_block = 0 if prefix_apart else shared  # prefix keys each block reads
    if len(groups) < 2 or 2 * len(groups) * n_queries * (per_block + n_keys) > n * (per_block + n):
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
    mask = torch.gather(rows[..., shared:], 2, keys[:, None, :].expand(-1, n_queries, -1)) & key_valid[:, None, :]
    if not prefix_apart:
        mask = torch.cat([rows[..., :shared], mask], dim=2)
    return TreeBlocks(shared, queries, query_valid, keys, mask[:, None], prefix_apart)


def blocked_attention(query: Any, key: Any, value: Any, blocks: TreeBlocks, scaling: float | None) -> Any:
    """Attention of a batch-1 pass over a packed tree: ``query`` [1, heads, nodes, dim], ``key``/``value``
    [1, kv heads, shared + nodes, dim]; returns [1, nodes, heads, dim] as transformers' attention functions do."""
    if blocks.prefix_apart:
        return _prefix_apart(query, key, value, blocks, scaling)
    return _prefix_in_every_block(query, key, value, blocks, scaling)


def _prefix_apart(query: Any, key: Any, value: Any, blocks: TreeBlocks, scaling: float | None) -> Any:
    """The blocks attend to their tree keys; every node attends to the whole cached prefix in one unmasked pass,
    and the two parts are joined by their log-sum-exps. The query heads that share a key head are stacked as more
    queries of that head (grouped-query attention without K/V copies)."""
    import torch

    shared, (_, heads, n, dim), kv_heads = blocks.shared, query.shape, key.shape[1]
    groups = heads // kv_heads
    n_blocks, n_queries = blocks.queries.shape
    q = query[0][:, blocks.queries].transpose(0, 1).reshape(n_blocks, kv_heads, groups * n_queries, dim)
    out, lse = _attention_with_lse(q, _tree_keys(key, blocks), _tree_keys(value, blocks),
                                   blocks.bias(q.dtype, groups), scaling)
    result = _to_nodes(out.reshape(n_blocks, heads, n_queries, dim), blocks, query.new_empty((n, heads, dim)))
    if not shared:
        return result[None]
    # fp32 whatever the model's dtype: half-precision log-sum-exps would weigh the parts up to 1% off
    tree_lse = _to_nodes(lse.reshape(n_blocks, heads, n_queries), blocks, lse.new_empty((n, heads)))
    prefix_out, prefix_lse = _attention_with_lse(query.reshape(1, kv_heads, groups * n, dim), key[:, :, :shared],
                                                 value[:, :, :shared], None, scaling)
    prefix_out = prefix_out.reshape(heads, n, dim).transpose(0, 1)  # [nodes, heads, dim]
    prefix_lse = prefix_lse.reshape(heads, n).transpose(0, 1)
    total = torch.logaddexp(prefix_lse, tree_lse)
    prefix_weight, tree_weight = (torch.exp(part - total)[..., None].to(query.dtype) for part in (prefix_lse, tree_lse))
    return (prefix_out * prefix_weight + result * tree_weight)[None]


def _prefix_in_every_block(query: Any, key: Any, value: Any, blocks: TreeBlocks, scaling: float | None) -> Any:
    """Each block's keys are the cached prefix followed by its tree keys; one SDPA call over all blocks."""
    import torch
    import torch.nn.functional as F

    shared, n_blocks = blocks.shared, blocks.queries.shape[0]
    q = query[0][:, blocks.queries].transpose(0, 1)  # [blocks, heads, Q, dim]
    k, v = _tree_keys(key, blocks), _tree_keys(value, blocks)
    if shared:
        k = torch.cat([key[0][:, :shared].expand(n_blocks, -1, -1, -1), k], dim=2)
        v = torch.cat([value[0][:, :shared].expand(n_blocks, -1, -1, -1), v], dim=2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=blocks.mask, scale=scaling,
                                         enable_gqa=q.shape[1] != k.shape[1])  # [blocks, heads, Q, dim]
    return _to_nodes(out, blocks, query.new_empty((query.shape[2], query.shape[1], query.shape[3])))[None]


def _tree_keys(states: Any, blocks: TreeBlocks) -> Any:
    """Each block's tree keys (or values) out of ``states`` [1, kv heads, shared + nodes, dim]: [blocks, kv heads,
    K, dim]."""
    return states[0][:, blocks.shared :][:, blocks.keys].transpose(0, 1)


def _to_nodes(per_block: Any, blocks: TreeBlocks, into: Any) -> Any:
    """``into`` [nodes, heads, ...] with each block's real query rows of ``per_block`` [blocks, heads, Q, ...] at
    their nodes."""
    into[blocks.queries[blocks.query_valid]] = per_block.transpose(1, 2)[blocks.query_valid]
    return into


def _attention_with_lse(q: Any, k: Any, v: Any, bias: Any, scaling: float | None) -> tuple[Any, Any]:
    """Softmax attention of ``q`` [batch, kv heads, queries, dim] over ``k``/``v`` plus ``bias`` (0 or -inf, None
    for none), and the log-sum-exp of each query's scaled scores: torch's CPU flash kernel returns both."""
    import torch

    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias, scale=scaling)


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
