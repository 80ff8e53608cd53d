"""How each bucket moves from the rank that reads it to the ranks that need it.

One module per route, each behind the small :class:`~distshard.routes.shared.Route` interface:

- :mod:`~distshard.routes.page_cache` -- every rank wants every tensor whole, on the CPU, and
  its node reads every byte itself in the checkpoint's dtypes: the checkpoint files' own page
  cache is the node's one copy, which every rank maps;
- :mod:`~distshard.routes.node_image` -- the same loads otherwise: one image of the tensors in
  ``/dev/shm`` per node, each bucket read once into its reader's node and sent once to every
  other node (:mod:`~distshard.routes.image_layout` says where each tensor lies in it);
- :mod:`~distshard.routes.broadcast` -- a bucket every rank wants whole, broadcast by the
  backend into each rank's own tensors;
- :mod:`~distshard.routes.own_rows` -- a bucket of DTensor shards made of whole rows, each row
  wanted by one rank: every rank reads its own rows straight into its shard;
- :mod:`~distshard.routes.slices` -- any other bucket: its reader cuts each rank's pieces and
  sends them point to point;
- :mod:`~distshard.routes.converted` -- how a bucket made by a conversion is read: its sources
  whole, on its reader, through transformers' operation (then it moves as any bucket).

Which route a bucket takes is decided by :func:`distshard.routes.choose.choose`, a pure
function of the plan and the layout; :class:`distshard.routes.exchange.Exchange` runs the
chosen steps. What routes share (failure guard, fill accounting, buffers, reader threads) is
:mod:`~distshard.routes.shared`, and the read-ahead of buckets sent through the backend is
:mod:`~distshard.routes.readahead`. No rank ever holds a full copy of a tensor it did not read.
"""
