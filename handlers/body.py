"""Reading a request body within a size limit and a time limit.

The server's parser does not inflate bodies (`auto_decompress` is off, see
`handlers.server`): a compressed body is inflated here, chunk by chunk, and its inflated
size counts against the same limit, so a small gzip bomb is a 413 after `limit` bytes of
work, not an allocation of its full size. Only `identity`, `gzip` and `deflate` are
accepted. Callers authenticate first: nothing is read for a refused request.
"""

from __future__ import annotations

import asyncio
import zlib

from aiohttp import web

_READ_CHUNK = 64 * 1024
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class BodyError(Exception):
    """The body cannot be accepted; `status` is the HTTP answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def read_limited(request: web.Request, limit: int, seconds: float) -> bytes:
    """The body (inflated), or BodyError 400/408/413/415."""
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding in ("", "identity"):
        inflater = None
    elif encoding in _WBITS:
        inflater = zlib.decompressobj(_WBITS[encoding])
    else:
        raise BodyError(415, "Content-Encoding must be identity, gzip or deflate")
    if request.content_length is not None and request.content_length > limit:
        raise BodyError(413, f"body larger than {limit} bytes")
    content = request.content
    if inflater is None and content.is_eof():
        # The whole body has arrived already (a webhook usually comes in one segment
        # with its head): no wait, so no timer and no chunk iteration.
        body = content.read_nowait(-1)
        if len(body) > limit:
            raise BodyError(413, f"body larger than {limit} bytes")
        return body
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(seconds):
            async for chunk in content.iter_chunked(_READ_CHUNK):
                if inflater is None:
                    size += len(chunk)
                    if size > limit:
                        raise BodyError(413, f"body larger than {limit} bytes")
                    parts.append(chunk)
                    continue
                pending = chunk
                while pending:
                    out = inflater.decompress(pending, limit - size + 1)
                    size += len(out)
                    if size > limit:
                        raise BodyError(413, f"body larger than {limit} bytes once inflated")
                    parts.append(out)
                    pending = inflater.unconsumed_tail
    except TimeoutError:
        raise BodyError(408, f"body not received within {seconds:g} s") from None
    except zlib.error:
        raise BodyError(400, f"body is not valid {encoding}") from None
    if inflater is not None and not inflater.eof:
        raise BodyError(400, f"body is not valid {encoding} (truncated)")
    return b"".join(parts)
