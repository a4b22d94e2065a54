"""HTTP routers by concern: ``v1`` (images in, images out), ``v2`` (Open Inference Protocol), ``ops``; and what
they share about request bodies."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Request

from service.api.errors import Problem


def content_encoding(request: Request, accepted: tuple[str, ...] = (),
                     problem: Callable[[int, str], Problem] = Problem) -> str | None:
    """The body's Content-Encoding, lower-cased (None: sent as is); Problem 415 for one not in ``accepted``."""
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding not in accepted:
        can = f"send it as is, or with {' or '.join(accepted)}" if accepted else "send the body as is"
        raise problem(415, f"Content-Encoding {encoding!r} is not accepted here: {can}")
    return encoding
