"""Where images come from: folders, list files, webdataset tar shards and parquet files, local or on object storage.

`discover` lists a source as sorted keys and says where each image's bytes are (a path, or a `Member`: a byte
range in a tar shard, a row of a parquet file); nothing here decodes an image or knows of a cache. A new source
format is a module here that lists keys and reads one member's bytes (see archive.py and parquet.py).
"""
