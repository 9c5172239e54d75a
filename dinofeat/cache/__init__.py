"""The cache format and its whole life: the only layer that imports zarr.

Files and objects (`objects`, local folders and object-store prefixes), the lock, shards encoded and read with
their checksums (`shardfile`), metadata with its own checksums, the index, done markers, statistics, and the cache's
life (`lifecycle`: create, resume, extend, seal, retire, repair, prune). It knows nothing of extraction: the plan it
stores is data (`layout`), made by whoever extracts.
"""
