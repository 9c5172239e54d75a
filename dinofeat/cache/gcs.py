"""Conditional writes on Google Cloud Storage: an upload with `ifGenerationMatch`, which GCS refuses (412) unless the
object is at that generation ('0': absent). gcsfs offers only the create form (`pipe_file(mode="create")`) and does
not return the new generation, which a replace needs next time; so the few lock and metadata writes that must be
conditional are one multipart upload each, made here through gcsfs's own request (its session, credentials and
retries). Everything else on gs:// goes through gcsfs as before.

A retry of such an upload whose first answer was lost finds its own write and is refused: a lock then reads as held
by this same run, a metadata write as a conflict. Both stop the run (nothing is overwritten); a rerun goes on.
"""

from __future__ import annotations

import json
from typing import Any

SCHEMES = ("gs", "gcs")
_BOUNDARY = "==0=="


def version_of(info: dict[str, Any]) -> str | None:
    """An object's generation (what `put` compares with), from gcsfs's info."""
    generation = info.get("generation")
    return None if generation in (None, "") else str(generation)


def put(fs: Any, key: str, data: bytes, generation: str) -> str | None:
    """Write `data` to `key` ('bucket/path') only if the object is at `generation` ('0': only if it does not exist).
    Returns the new generation, or None when GCS refused (the object changed, or exists, since)."""
    bucket, _, name = key.partition("/")
    head = f"--{_BOUNDARY}\nContent-Type: application/json; charset=UTF-8\n\n{json.dumps({'name': name})}\n"
    body = f"{head}--{_BOUNDARY}\nContent-Type: application/octet-stream\n\n".encode() + data + b"\n--==0==--"
    location = getattr(fs, "_location", None) or "https://storage.googleapis.com"
    try:
        out = fs.call(
            "POST",
            f"{location}/upload/storage/v1/b/{{}}/o",
            bucket,
            uploadType="multipart",
            ifGenerationMatch=generation,
            headers={"Content-Type": f'multipart/related; boundary="{_BOUNDARY}"'},
            data=body,
            json_out=True,
        )
    except FileExistsError:  # gcsfs's word for 412 Precondition Failed
        return None
    return str(out["generation"])
