"""The weights: everything between a checkpoint in a source and verified bytes in the arena.

A newcomer's map, in the order bytes travel:
- ``safetensors``: parsing shard headers, refusing anything that is not clean safetensors (hostile
  input safe); ``layout``: the layer map (which tensors make up the embeddings, each block, the head);
- ``sources`` (filesystem, S3): ranged reads of the checkpoint; ``modelsource``: finding and pinning
  the manifest of the model a node works on (``provenance``: expected root and Ed25519 signature);
- ``manifest``: the manifest format (records, per-tensor and per-unit digests, checks on read, range
  proofs); ``merkle``: the tree over layer units whose root names a model version; ``scan``: the one
  hashing pass that ``build`` (making a manifest) and ``verify`` (checking bytes and side files against
  one, as nodes and ``butterfly-admin manifest verify`` do) share;
- ``streamer``: reading ranges into the arena at line rate with inline xxh3 (Cython engine and its
  plain Python twin); ``hashing``: the validator's multi-threaded BLAKE3; ``cache``: the verified
  on-disk copy of a node's blocks;
- ``testmodel`` / ``testtokenizer``: a generated Llama-shaped checkpoint with tokenizer and manifest,
  so everything runs offline.

Must not: know about the cluster, the board or serving; the loader and validator build on this.
"""
