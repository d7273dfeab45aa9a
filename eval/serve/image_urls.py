"""Fetching a query image named by URL (clip-retrieval's `image_url`), off unless `--allow-image-urls`.

A service that fetches any URL it is sent is an open proxy: it can be made to reach hosts only it
can see (its own loopback, the private network, cloud metadata addresses) and to spend its
bandwidth on someone else's behalf. So fetching is off by default, and when an operator turns it
on, every fetch is bounded: http and https only, no redirects (a redirect could lead anywhere,
including to another scheme), at most `max_bytes` read whatever Content-Length says, and a
timeout for the whole exchange. The bytes then go through the same image admission checks as an
uploaded query image. docs/serve.md says what turning it on exposes.
"""
from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from eval.serve.requests import BadRequest

USER_AGENT = "mmssl-serve (image_url query)"
_CHUNK = 64 * 1024


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def refuse(self, req, fp, code, msg, headers):
        raise BadRequest(400, f"image_url answered with a redirect ({code}); redirects are not followed")

    http_error_301 = http_error_302 = http_error_303 = http_error_307 = http_error_308 = refuse


_OPENER = urllib.request.build_opener(_NoRedirects)


def check_image_url(url) -> str:
    """The URL when it is an http(s) URL with a host; BadRequest otherwise."""
    if not isinstance(url, str) or not url or len(url) > 4096:
        raise BadRequest(400, "image_url must be an http(s) URL of at most 4096 characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest(400, "image_url must be an http:// or https:// URL with a host")
    return url


def fetch_image_bytes(url: str, max_bytes: int, timeout: float) -> bytes:
    """The body of GET `url` (at most `max_bytes`), or BadRequest: 400 for a URL that cannot be
    fetched or answers with an error, 413 for a body over the limit, 504 for a timeout."""
    request = urllib.request.Request(check_image_url(url), headers={"User-Agent": USER_AGENT})
    deadline = time.monotonic() + timeout   # the socket timeout bounds each read, this the whole body
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise BadRequest(413, f"image_url body is {declared} bytes, over {max_bytes}")
            chunks, size = [], 0
            while chunk := response.read(_CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise BadRequest(413, f"image_url body is over {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise TimeoutError
                chunks.append(chunk)
            return b"".join(chunks)
    except BadRequest:
        raise
    except urllib.error.HTTPError as err:
        raise BadRequest(400, f"image_url answered HTTP {err.code}") from None
    except (socket.timeout, TimeoutError):
        raise BadRequest(504, f"image_url not fetched within {timeout:g} s (--image-url-timeout)") from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, (socket.timeout, TimeoutError)):
            raise BadRequest(504, f"image_url not fetched within {timeout:g} s (--image-url-timeout)") from None
        raise BadRequest(400, f"image_url could not be fetched ({str(reason)[:200]})") from None
