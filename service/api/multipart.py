"""multipart/form-data parsing: Starlette's parser, plus parts named only by RFC 5987/2231 ``filename*=``,
and a look at each file's first bytes while it arrives.

Starlette treats a part as a file only when its Content-Disposition has ``filename=``; a
client that sends only ``filename*=UTF-8''%C3%A9t%C3%A9.png`` (RFC 6266 allows it, curl and
browsers send both) would have its image read as a text field. Such a part is a file here,
named by the decoded ``filename*``.

``header(index, filename, start)``: called with the first bytes of the ``index``-th file part
named ``field`` once they pass each of ``peeks`` bytes, until it returns True (the caller has
what it needs: an image's header, so its cost is known before the rest of the body is read).
What it raises ends the parse.
"""

from __future__ import annotations

import logging
import re
import urllib.parse
from collections.abc import Callable, Sequence

from starlette.datastructures import FormData
from starlette.formparsers import MultiPartParser
from starlette.requests import Request

# python-multipart logs a WARNING for each malformed body, then raises; the client gets the same reason in its 400.
# At WARNING, every bad request would add a line to the server's log: a client could fill it at will.
logging.getLogger("python_multipart.multipart").setLevel(logging.ERROR)

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


HeaderCallback = Callable[[int, str, bytes], bool]


class _Parser(MultiPartParser):
    def __init__(self, *args: object, header: HeaderCallback | None = None, field: str = "file",
                 peeks: Sequence[int] = (), **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._header, self._field, self._all_peeks = header, field, tuple(peeks)
        self._files_seen = -1  # index of the current file part among those named `field`
        self._start: bytearray | None = None  # the current file part's first bytes, while they are offered
        self._peeks: list[int] = []

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        super().on_part_data(data, start, end)
        if self._start is None:
            return
        self._start += data[start:end]
        if len(self._start) < self._peeks[0]:
            return
        while self._peeks and len(self._start) >= self._peeks[0]:
            self._peeks.pop(0)
        part = self._current_part.file
        done = self._header(self._files_seen, (part.filename if part else None) or f"file{self._files_seen}",
                            bytes(self._start))
        if done or not self._peeks:
            self._start = None

    def on_headers_finished(self) -> None:
        disposition = self._current_part.content_disposition or b""
        if b"filename=" not in disposition.lower().replace(b" ", b""):
            name = ext_filename(disposition)
            if name is not None:  # give Starlette a plain filename= it understands (quotes escaped)
                quoted = name.replace("\\", "\\\\").replace('"', '\\"').encode("utf-8")
                self._current_part.content_disposition = disposition + b'; filename="' + quoted + b'"'
        super().on_headers_finished()
        self._start = None
        if self._current_part.file is not None and self._current_part.field_name == self._field:
            self._files_seen += 1
            if self._header is not None and self._all_peeks:
                self._start, self._peeks = bytearray(), list(self._all_peeks)


async def parse_form(request: Request, *, max_files: int, max_fields: int, header: HeaderCallback | None = None,
                     field: str = "file", peeks: Sequence[int] = ()) -> FormData:
    """``request.form()`` for multipart bodies, accepting ``filename*=``, offering each ``field`` file's first
    bytes to ``header`` (see module docstring)."""
    return await _Parser(request.headers, request.stream(), max_files=max_files, max_fields=max_fields,
                         header=header, field=field, peeks=peeks).parse()
