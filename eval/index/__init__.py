"""FAISS search indexes over image embeddings.

`choose` picks the index type from size and memory budget, `build` trains/fills it and `tune`
sets efSearch / nprobe to a recall target; `collection` gathers vectors, metadata and tuning
queries (from shards via `eval.embed`, with `shard_members` locating each image in its tar, or
from an embeddings .npy); `metadata` keeps rows aligned with ids and `store` saves and loads the
index folder; `query` embeds queries with the index's model and `search` answers them; `cli` is
`mmssl index build|search`; `synthetic` makes clustered test vectors.
"""
