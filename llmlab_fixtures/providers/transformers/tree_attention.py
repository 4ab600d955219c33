"""Block-sparse attention for a packed token tree: each block of nodes attends only to the keys it may see.

A packed tree (``token_tree.pack_tree``) is one forward pass whose tokens attend through a mask to the cached prefix
and their own ancestors. SDPA with that mask scores every token against every key of the pass and the prefix,
although a token sees only its item's few dozen nodes: on a CPU that dense attention is about a fifth of a 512-token
pass. Here the packed sequences are cut into blocks of consecutive sequences of about ``BLOCK_QUERIES`` new nodes;
a block's queries are the nodes its sequences added, its keys every node on their paths. The blocks go through
attention in up to three batches of similar size, each padded to its longest block (one long MMLU question does not
pad every short block to its length), and the outputs are put back in node order.

The cached prefix every node sees is attended one of two ways. On a CPU, apart: one unmasked pass of all nodes over
the prefix, joined to the blocks' outputs by each query's log-sum-exp (torch's CPU flash kernel returns it), so the
prefix is read once a layer and the cost of a node does not grow with the size of its tree. Elsewhere, copied in
front of every block's keys, in one SDPA call a batch. Each token attends to exactly the keys the mask allows
either way, so the outputs match dense attention to rounding.

``install_tree_attention()`` wraps transformers' ``sdpa`` attention function (for every model in the process): a
pass given a ``TreeBlocks`` as ``llmlab_tree_blocks`` takes this path, every other call goes to SDPA unchanged.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from llmlab_fixtures.providers.transformers.token_tree import PackedTree

BLOCK_QUERIES = 64  # nodes a block adds (a block of several short items, or one long item)
MAX_BATCHES = 3  # attention calls a layer may make for one tree's blocks
BATCH_COST = 40_000  # what one more such call costs (its gathers, the kernel's start), in query-key pairs
TREE_BLOCKS_KWARG = "llmlab_tree_blocks"


@dataclass
class BlockBatch:
    """Blocks padded to one size and attended in one call: ``queries`` [blocks, Q] and ``keys`` [blocks, K] are node
    indices (padding repeats a real node); ``mask`` the keys each query may attend to, [blocks, 1, Q, K] over the
    tree keys where the prefix is attended apart, else [blocks, 1, Q, shared + K] with the prefix first; ``rows``
    the positions of the real queries in the flattened [blocks x Q] and ``nodes`` their nodes."""

    queries: Any
    keys: Any
    mask: Any
    rows: Any
    nodes: Any
    _bias: dict[Any, Any] = field(default_factory=dict, repr=False)

    def to(self, device: Any) -> BlockBatch:
        """The same batch with its tensors on ``device``."""
        return BlockBatch(*(t.to(device) for t in (self.queries, self.keys, self.mask, self.rows, self.nodes)))

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
class TreeBlocks:
    """A tree's blocks, in up to ``MAX_BATCHES`` batches of similar size (MMLU's long questions do not pad its short
    blocks), after ``shared`` cached prefix tokens that every node attends to: in a pass of its own where
    ``prefix_apart``, else copied in front of every block's keys."""

    shared: int
    batches: list[BlockBatch]
    prefix_apart: bool = False

    def to(self, device: Any) -> TreeBlocks:
        """The same blocks with their tensors on ``device``."""
        return TreeBlocks(self.shared, [batch.to(device) for batch in self.batches], self.prefix_apart)


@dataclass
class _Group:
    """Consecutive packed sequences that form one block: the nodes they added and every node on their paths."""

    first: int
    end: int
    keys: set[int] = field(default_factory=set)

    @property
    def size(self) -> int:
        return self.end - self.first


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
    groups: list[_Group] = []
    node = 0
    for path, added in zip(tree.paths, tree.new_nodes):
        if not groups or node + added - groups[-1].first > block_queries:
            groups.append(_Group(node, node))
        node += added
        groups[-1].end = node
        groups[-1].keys.update(path)
    n = len(tree.tokens)
    per_block = 0 if prefix_apart else shared  # prefix keys each block reads
    if len(groups) < 2:
        return None
    batches, cost = _batch_by_size(groups, per_block)
    if 2 * cost > n * (per_block + n):
        return None
    return TreeBlocks(shared, [_block_batch(batch, allowed, shared, prefix_apart) for batch in batches], prefix_apart)


def _batch_by_size(groups: list[_Group], per_block: int) -> tuple[list[list[_Group]], int]:
    """The groups, ordered by size, cut into at most ``MAX_BATCHES`` runs padded to their own largest block, where
    the padded attention (query-key pairs, ``BATCH_COST`` a call) is least; and that cost."""
    ordered = sorted(groups, key=lambda group: (group.size, len(group.keys)))
    count = len(ordered)
    widest = [[0] * (count + 1) for _ in range(count)]  # widest[i][j]: most keys of a block in ordered[i:j]
    for i in range(count):
        for j in range(i + 1, count + 1):
            widest[i][j] = max(widest[i][j - 1], len(ordered[j - 1].keys))

    def cost(i: int, j: int) -> int:
        return (j - i) * ordered[j - 1].size * (per_block + widest[i][j]) + BATCH_COST

    # cheapest[j - 1]: the least cost of ordered[:j] in one batch, then (one round each) in up to two, three..., with
    # the cut points
    cheapest = [(cost(0, j), [0, j]) for j in range(1, count + 1)]
    for _ in range(MAX_BATCHES - 1):
        fewer = list(cheapest)  # up to one batch fewer; cheapest is updated in place
        for j in range(2, count + 1):
            for i in range(1, j):  # the last batch is ordered[i:j]; on a tie, the earlier cuts
                cheapest[j - 1] = min(cheapest[j - 1], (fewer[i - 1][0] + cost(i, j), [*fewer[i - 1][1], j]))
    total, cuts = cheapest[-1]
    return [ordered[a:b] for a, b in itertools.pairwise(cuts)], total


def _block_batch(groups: list[_Group], allowed: Any, shared: int, prefix_apart: bool) -> BlockBatch:
    """One batch of blocks, padded to its largest: their query and key nodes and mask."""
    import torch

    n_queries = max(group.size for group in groups)
    n_keys = max(len(group.keys) for group in groups)
    queries = torch.zeros((len(groups), n_queries), dtype=torch.long)
    query_valid = torch.zeros((len(groups), n_queries), dtype=torch.bool)
    keys = torch.zeros((len(groups), n_keys), dtype=torch.long)
    key_valid = torch.zeros((len(groups), n_keys), dtype=torch.bool)
    for b, group in enumerate(groups):
        queries[b, : group.size] = torch.arange(group.first, group.end)
        queries[b, group.size :] = group.first
        query_valid[b, : group.size] = True
        ordered = sorted(group.keys)
        keys[b, : len(ordered)] = torch.tensor(ordered)
        keys[b, len(ordered) :] = ordered[0]
        key_valid[b, : len(ordered)] = True
    rows = allowed[queries]  # [blocks, Q, shared + nodes]
    mask = torch.gather(rows[..., shared:], 2, keys[:, None, :].expand(-1, n_queries, -1)) & key_valid[:, None, :]
    if not prefix_apart:
        mask = torch.cat([rows[..., :shared], mask], dim=2)
    real = query_valid.flatten().nonzero().squeeze(1)
    return BlockBatch(queries, keys, mask[:, None], real, queries.flatten()[real])


def blocked_attention(query: Any, key: Any, value: Any, blocks: TreeBlocks, scaling: float | None) -> Any:
    """Attention of a batch-1 pass over a packed tree: ``query`` [1, heads, nodes, dim], ``key``/``value``
    [1, kv heads, shared + nodes, dim]; returns [1, nodes, heads, dim] as transformers' attention functions do."""
    if blocks.prefix_apart:
        return _prefix_apart(query, key, value, blocks, scaling)
    return _prefix_in_every_block(query, key, value, blocks, scaling)


def _prefix_apart(query: Any, key: Any, value: Any, blocks: TreeBlocks, scaling: float | None) -> Any:
    """The blocks attend to their tree keys; every node attends to the whole cached prefix in one unmasked pass,
    and the two parts are joined by their log-sum-exps. The query heads that share a key head are stacked as more
    queries of that head (grouped-query attention without K/V copies). Both parts are laid out [heads, nodes, ...],
    as the kernel returns them, so the join reads memory in order."""
    import torch

    shared, (_, heads, n, dim), kv_heads = blocks.shared, query.shape, key.shape[1]
    groups = heads // kv_heads
    result, tree_lse = query.new_empty((heads, n, dim)), None
    for batch in blocks.batches:
        n_blocks, n_queries = batch.queries.shape
        q = query[0][:, batch.queries].transpose(0, 1).reshape(n_blocks, kv_heads, groups * n_queries, dim)
        out, lse = _attention_with_lse(q, _tree_keys(key, shared, batch), _tree_keys(value, shared, batch),
                                       batch.bias(q.dtype, groups), scaling)
        _to_nodes(out.reshape(n_blocks, heads, n_queries, dim), batch, result)
        if shared:  # fp32 whatever the model's dtype: half-precision log-sum-exps would weigh the parts up to 1% off
            tree_lse = lse.new_empty((heads, n)) if tree_lse is None else tree_lse
            _to_nodes(lse.reshape(n_blocks, heads, n_queries), batch, tree_lse)
    if shared:
        prefix_out, prefix_lse = _attention_with_lse(query.reshape(1, kv_heads, groups * n, dim),
                                                     key[:, :, :shared], value[:, :, :shared], None, scaling)
        prefix_lse = prefix_lse.reshape(heads, n)
        tree_weight = torch.sigmoid(tree_lse - prefix_lse)  # e^tree / (e^prefix + e^tree)
        result = torch.lerp(prefix_out.reshape(heads, n, dim), result, tree_weight[..., None].to(query.dtype))
    return result.transpose(0, 1)[None]


def _prefix_in_every_block(query: Any, key: Any, value: Any, blocks: TreeBlocks, scaling: float | None) -> Any:
    """Each block's keys are the cached prefix followed by its tree keys; one SDPA call a batch."""
    import torch
    import torch.nn.functional as F

    shared, result = blocks.shared, query.new_empty(query.shape[1:])
    for batch in blocks.batches:
        n_blocks = batch.queries.shape[0]
        q = query[0][:, batch.queries].transpose(0, 1)  # [blocks, heads, Q, dim]
        k, v = _tree_keys(key, shared, batch), _tree_keys(value, shared, batch)
        if shared:
            k = torch.cat([key[0][:, :shared].expand(n_blocks, -1, -1, -1), k], dim=2)
            v = torch.cat([value[0][:, :shared].expand(n_blocks, -1, -1, -1), v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=batch.mask, scale=scaling,
                                             enable_gqa=q.shape[1] != k.shape[1])  # [blocks, heads, Q, dim]
        _to_nodes(out, batch, result)
    return result.transpose(0, 1)[None]


def _tree_keys(states: Any, shared: int, batch: BlockBatch) -> Any:
    """Each block's tree keys (or values) out of ``states`` [1, kv heads, shared + nodes, dim]: [blocks, kv heads,
    K, dim]."""
    return states[0][:, shared:][:, batch.keys].transpose(0, 1)


def _to_nodes(per_block: Any, batch: BlockBatch, into: Any) -> None:
    """Each block's real query rows of ``per_block`` [blocks, heads, Q, ...] written at their nodes in ``into``
    [heads, nodes, ...]."""
    into[:, batch.nodes] = per_block.transpose(0, 1).flatten(1, 2)[:, batch.rows]


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
