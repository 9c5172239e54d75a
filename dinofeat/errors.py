"""One exception family. Configuration problems raise before any work starts; per-image problems are data."""


class DinofeatError(Exception):
    """Base class: the CLI prints the message and exits 1."""


class ConfigError(DinofeatError):
    """A setting that cannot work (bad model spec, bucket multiple vs patch size, dtype, paths)."""


class CacheMismatchError(DinofeatError):
    """An existing cache was made with different settings; it is refused, never silently reused."""


class CacheFormatError(DinofeatError):
    """A cache this build cannot read: unknown format version, missing metadata, unsealed, damaged."""


class TokenCountError(DinofeatError):
    """The model returned a token count other than 1 + registers + h*w: the run stops, nothing is written."""


class ImageError(Exception):
    """One image could not be used. Not a DinofeatError: it is recorded with its reason and the run goes on."""


CHANGED_SINCE_PLANNED = "changed since planned"  # how the reason of an ImageChangedError begins


class ImageChangedError(ImageError):
    """An image whose header no longer gives the size it was planned with (replaced by one of other dimensions):
    resized into its planned bucket it would be stored with another aspect, so it fails for that shard (its reason
    begins with CHANGED_SINCE_PLANNED) and the next run plans it again, into the bucket its new size belongs to."""


class CacheLockedError(DinofeatError):
    """Another run holds the cache's lock: this run stops before it deletes or writes anything."""


class CacheConflictError(DinofeatError):
    """The cache's metadata changed under this run (another writer despite the lock, e.g. on NFS): nothing of
    this run's metadata was written, so the other run's work is kept."""


class ChecksumError(CacheFormatError):
    """Stored bytes fail their crc32c: a damaged, moved or stale chunk, shard index or index column."""


class SourceChangedError(DinofeatError):
    """An archive no longer holds, at the place the plan recorded, the image the plan names (a tar shard rewritten
    since it was planned): the run stops before it stores another image's features; a rerun re-lists the source."""


class StoreError(DinofeatError):
    """The object store holding a cache failed after its client's retries (unreachable, no credentials, no such
    bucket, access refused): one line instead of a client's traceback chain. Finished shards are kept."""


class PeerStoppedError(DinofeatError):
    """A collective of a process group broke because another process of the run stopped: that process's own error
    is the one that says why (`--num-processes` reports it in preference to this one)."""
