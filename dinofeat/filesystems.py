"""One fsspec filesystem per scheme and process, with the store client's retries set: what every module that reads
or writes object storage goes through (cache files and zarr's own store; tar shards and parquet files on s3://).

Made on first use in each process, so a forked DataLoader worker never uses its parent's connections.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from dinofeat.errors import ConfigError

_FILESYSTEMS: dict[tuple[str, int], Any] = {}

STORE_ATTEMPTS = 6  # botocore attempts per request (DINOFEAT_STORE_ATTEMPTS): at most 31 s of backoff, 15 s on average
_RETRIES_SET: list[Any] = []  # the retry settings this module last put into fsspec's config (a user's own win)


def s3_retries() -> dict[str, Any]:
    """botocore's retry settings for every S3 filesystem of this process: DINOFEAT_STORE_ATTEMPTS (else
    AWS_MAX_ATTEMPTS, else 6) attempts per request, the first included, full-jitter exponential backoff
    (rand * 2^n s: at most 31 s, ~15 s on average, for 6 attempts) on connection errors, timeouts, 5xx and
    throttling. "legacy" mode (AWS_RETRY_MODE to change), not "standard": standard mode's retry quota is one per
    client (500 units, 5 per retry), so the 32 requests validate or a reader's fetch threads have in flight during
    an outage use it up in about three rounds of retries (2-3 s), and from then on every request fails at its first
    error (issue 32.9). Legacy mode backs off the same way, per request, with no shared quota."""
    attempts = os.environ.get("DINOFEAT_STORE_ATTEMPTS") or os.environ.get("AWS_MAX_ATTEMPTS") or STORE_ATTEMPTS
    try:
        total = max(1, int(attempts))
    except ValueError:
        raise ConfigError(
            f"DINOFEAT_STORE_ATTEMPTS (or AWS_MAX_ATTEMPTS) must be a number of attempts: {attempts!r}"
        ) from None
    return {"total_max_attempts": total, "mode": os.environ.get("AWS_RETRY_MODE") or "legacy"}


def _set_retry_defaults(scheme: str) -> None:
    """Put the retry settings into fsspec's config, where they reach zarr's own filesystem (zarr's FsspecStore makes
    one from the URL) as well as ours. A `config_kwargs.retries` the user configured (fsspec config file,
    FSSPEC_S3_* variables) is left alone."""
    if scheme not in ("s3", "s3a"):
        return  # gcsfs retries on its own: 6 tries, 1 + 2 + 4 + 8 + 16 s (plus jitter) apart, ~35 s in all
    import fsspec.config

    config = fsspec.config.conf.setdefault("s3", {}).setdefault("config_kwargs", {})
    if "retries" not in config or (_RETRIES_SET and config["retries"] is _RETRIES_SET[0]):
        config["retries"] = s3_retries()
        _RETRIES_SET[:] = [config["retries"]]


CLIENT_LOGGERS = {"gs": "gcsfs", "gcs": "gcsfs"}  # clients that log their own failures with tracebacks


def _quiet_client_log(scheme: str) -> None:
    """gcsfs logs every request that runs out of retries with `logger.exception`, and logging prints what no handler
    takes to stderr: an outage printed 137 lines of tracebacks before dinofeat's one line (issue 32.10). A
    NullHandler on its logger keeps them out of a process that configured no logging; a process that did (a root
    handler) still gets them."""
    name = CLIENT_LOGGERS.get(scheme)
    log = logging.getLogger(name) if name else None
    if log is not None and not any(isinstance(h, logging.NullHandler) for h in log.handlers):
        log.addHandler(logging.NullHandler())


def filesystem(scheme_or_url: str) -> Any:
    """This process's fsspec filesystem for a scheme ('s3') or a URL's scheme: made on first use in each process,
    so a forked DataLoader worker never uses its parent's connections. No listing cache: done markers, metadata and
    shards change under us, and a stale listing would hide that. Transient errors are retried by the client itself
    (`s3_retries`), within a bounded time."""
    scheme = scheme_or_url.split("://", 1)[0].lower()
    key = (scheme, os.getpid())
    fs = _FILESYSTEMS.get(key)
    if fs is None:
        import fsspec

        _set_retry_defaults(scheme)
        _quiet_client_log(scheme)
        try:
            cls = fsspec.get_filesystem_class(scheme)
        except ValueError:
            raise ConfigError(f"fsspec has no filesystem for {scheme}://") from None
        except ImportError as e:
            raise ConfigError(f"{scheme}://: {e} (for s3:// install dinofeat[s3])") from None
        try:
            fs = cls(skip_instance_cache=True, use_listings_cache=False)
        except TypeError:
            fs = cls(skip_instance_cache=True)
        _FILESYSTEMS[key] = fs
    return fs
