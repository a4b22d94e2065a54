"""multipart/form-data parsing: Starlette's parser, plus parts named only by RFC 5987/2231 ``filename*=``.

Starlette treats a part as a file only when its Content-Disposition has ``filename=``; a
client that sends only ``filename*=UTF-8''%C3%A9t%C3%A9.png`` (RFC 6266 allows it, curl and
browsers send both) would have its image read as a text field. Such a part is a file here,
named by the decoded ``filename*``.
"""

from __future__ import annotations

import re
import urllib.parse

from starlette.datastructures import FormData
from starlette.formparsers import MultiPartParser
from starlette.requests import Request

_EXT_FILENAME = re.compile(rb"""(?:^|;)\s*filename\*\s*=\s*([^;]*)""", re.I)


def ext_filename(disposition: bytes) -> str | None:
    """The decoded ``filename*`` of a Content-Disposition value (``charset'lang'pct-encoded``), or None."""
    m = _EXT_FILENAME.search(disposition)
    if not m:
        return None
    value = m.group(1).strip().strip(b'"').decode("latin-1")
    charset, sep, rest = value.partition("'")
    if not sep:
        return urllib.parse.unquote(value) or None
    _, _, encoded = rest.partition("'")
    try:
        return urllib.parse.unquote(encoded, encoding=charset or "utf-8", errors="strict") or None
    except (LookupError, UnicodeDecodeError):
        return urllib.parse.unquote(encoded, encoding="latin-1") or None


class _Parser(MultiPartParser):
    def on_headers_finished(self) -> None:
        disposition = self._current_part.content_disposition or b""
        if b"filename=" not in disposition.lower().replace(b" ", b""):
            name = ext_filename(disposition)
            if name is not None:  # give Starlette a plain filename= it understands (quotes escaped)
                quoted = name.replace("\\", "\\\\").replace('"', '\\"').encode("utf-8")
                self._current_part.content_disposition = disposition + b'; filename="' + quoted + b'"'
        super().on_headers_finished()


async def parse_form(request: Request, *, max_files: int, max_fields: int) -> FormData:
    """``request.form()`` for multipart bodies, accepting ``filename*=`` (see module docstring)."""
    return await _Parser(request.headers, request.stream(), max_files=max_files, max_fields=max_fields).parse()
