"""The precompute run: settings, planning (probed sizes -> buckets -> rows -> shards), the encoder (the only module
that imports transformers), token slicing, decode workers, the shard writer, ranks and launchers, and the run loop
(`run.extract`), which plans, extracts pending shards and asks the cache layer to finalize.
"""
