"""Object-store failures in one line.

When a store stays unreachable past its client's retries (dinofeat.cache.objects sets them), s3fs, botocore, aiohttp and
gcsfs end in long chains of chained tracebacks (an S3 outage mid-run printed ~1,150 lines). `store_errors` turns
the exceptions those clients raise, and the OSError forms s3fs wraps them in, into one `StoreError` line that names
the store, the client's own message and what to do. Our own errors (DinofeatError) pass unchanged, and so does any
OSError that no store client raised: a full local disk stays a disk error (precompute's `_disk_errors`).
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator
from typing import Any

from dinofeat.errors import DinofeatError, StoreError

RESUME = "finished shards are kept: rerun the same command to resume"
NO_CHANGE = "rerun once the store answers again"

_CREDENTIALS_HINT = {
    "s3": "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or an instance role",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS or run `gcloud auth application-default login`, or a service account",
}
_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError", "NoAuthTokenError")
_REFUSED_CODES = {"AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                  "InvalidToken", "TokenRefreshRequired", "AuthorizationHeaderMalformed"}  # fmt: skip


@functools.cache
def _client_errors() -> tuple[type[BaseException], ...]:
    """The exception bases of the store clients that are installed (each comes with an optional extra). Not
    `requests`: the model hub raises those too, and they are no store's."""
    found: list[type[BaseException]] = []
    with contextlib.suppress(ImportError):
        from botocore.exceptions import BotoCoreError, ClientError

        found += [BotoCoreError, ClientError]
    with contextlib.suppress(ImportError):
        import aiohttp

        found.append(aiohttp.ClientError)
    with contextlib.suppress(ImportError):
        from fsspec.exceptions import FSTimeoutError

        found.append(FSTimeoutError)
    with contextlib.suppress(ImportError):
        from gcsfs.retry import HttpError

        found.append(HttpError)
    with contextlib.suppress(ImportError):
        from google.auth.exceptions import GoogleAuthError

        found.append(GoogleAuthError)
    return tuple(found)


def client_error(e: BaseException) -> BaseException | None:
    """The store client's exception behind `e`: `e` itself, or the one an OSError wraps (s3fs raises
    OSError/FileNotFoundError/PermissionError `from` botocore's error). None for anything else."""
    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if isinstance(x, _client_errors()):
            return x
        if not isinstance(x, OSError):
            return None
        x = x.__cause__
    return None


def is_store_failure(e: BaseException) -> bool:
    """`e` came from an object store's client (and is not one of our own errors)."""
    return not isinstance(e, DinofeatError) and client_error(e) is not None


def _code(e: BaseException) -> str:
    """S3's error code ('NoSuchBucket', 'AccessDenied'), or ''."""
    response = getattr(e, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


def describe(e: BaseException) -> str:
    """The client's own message, on one line (botocore's names the endpoint or the error code; aiohttp's needs its
    class name to say anything)."""
    x = client_error(e) or e
    text = str(x) or type(x).__name__
    if type(x).__module__.split(".")[0] in ("aiohttp", "fsspec") or not str(x):
        text = f"{type(x).__name__}: {text}"
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= 300 else text[:297] + "..."


def store_message(e: BaseException, location: str, after: str = RESUME) -> str:
    """One line for a store failure at `location` (a URL; for a local cache, the failing store is its source)."""
    x = client_error(e) or e
    remote = "://" in location
    scheme = location.split("://", 1)[0] if remote else ""
    where = f" {location}" if remote else ""
    if type(x).__name__ in _NO_CREDENTIALS:
        hint = _CREDENTIALS_HINT.get({"s3a": "s3", "gcs": "gs"}.get(scheme, scheme))
        return f"no credentials for {location if remote else 'the object store'} ({hint or describe(e)})"
    code = _code(x)
    if code == "NoSuchBucket" and remote:
        bucket = location.split("://", 1)[1].split("/", 1)[0]
        return f"bucket {bucket!r} does not exist ({location})"
    if code in _REFUSED_CODES or getattr(x, "code", None) in (401, 403):
        return f"object store{where} refused access: {describe(e)} (check the credentials and the bucket's permissions)"
    return f"object store{where} failed: {describe(e)}; {after}"


@contextlib.contextmanager
def store_errors(location: Any, after: str = RESUME, chained: bool = True) -> Iterator[None]:
    """Raise a store client's failure inside as one StoreError line naming `location` (a cache's URL or path).
    `chained=False` leaves the client's exception out of the traceback (readers: see `as_store_error`)."""
    try:
        yield
    except DinofeatError:
        raise
    except Exception as e:
        error = as_store_error(e, location, after)
        if error is None:
            raise
        if chained:
            raise error from e
        raise error from None


def as_store_error(e: BaseException, location: Any, after: str = NO_CHANGE) -> StoreError | None:
    """The StoreError line for a store client's failure `e` (None for anything else). Readers raise it without the
    client's exception chained: in a DataLoader worker, torch sends the worker's whole traceback as the error's
    text, and the client's chain (aiohttp, botocore) made that a hundred lines around dinofeat's one."""
    if isinstance(e, DinofeatError) or not is_store_failure(e):
        return None
    notes = getattr(e, "__notes__", ())  # what was left behind (a lock object that could not be released)
    return StoreError("\n".join([store_message(e, str(location), after), *notes]))
