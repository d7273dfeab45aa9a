"""Reading and validating `POST /search` requests: every client mistake becomes a 4xx with a message.

The body must be declared JSON (415 otherwise: a web page can post text/plain or a form to a
localhost service without a CORS preflight, but not application/json). Its size limit is enforced
while reading (a client may lie about or omit Content-Length), so an oversized body is refused
after at most `limit` bytes (413), never buffered whole (the connection stays open so that the
client reads the answer: closing on unread data resets it); a body not received within `timeout`
seconds is refused with 408 and the connection closed, so a slow client holds nothing but its
socket for a bounded time; and all bodies held at once share one byte budget (503 when spent).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
from dataclasses import dataclass, field

from mmssl.errors import UserError

CLOSE = {"Connection": "close"}
RETRY = {"Retry-After": "1"}


class BadRequest(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass
class SearchQuery:
    kind: str          # "text" | "image"
    value: object      # the text, or the image field as sent (base64)
    k: int
    index: str | None = None   # the served index's name (None: the first)
    rerank_k: int | None = None  # candidates to re-rank (None: the service's default, 0: none)


@dataclass
class BodyBudget:
    """Bytes of request bodies held at once, across requests (all in the event loop: no lock)."""

    limit: int
    used: int = 0


@dataclass
class Reservation:
    """One request's share of a BodyBudget; `release` gives it back."""

    budget: BodyBudget
    held: int = field(default=0)

    def add(self, size: int) -> None:
        if self.budget.used + size > self.budget.limit:
            raise BadRequest(503, "the service is receiving too much data at once; retry shortly", RETRY)
        self.budget.used += size
        self.held += size

    def release(self) -> None:
        self.budget.used -= self.held
        self.held = 0


def require_json_content_type(request) -> None:
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise BadRequest(415, "Content-Type must be application/json")


async def read_limited_body(request, limit: int, timeout: float | None = None,
                            reservation: Reservation | None = None) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, f"request body over {limit} bytes")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise BadRequest(413, f"request body over {limit} bytes")
                if reservation is not None:
                    reservation.add(len(chunk))
                chunks.append(chunk)
    except TimeoutError:
        raise BadRequest(408, f"request body not received within {timeout:g} s", CLOSE) from None
    return b"".join(chunks)


def parse_search_request(body: bytes, max_k: int, max_text_chars: int | None = None) -> SearchQuery:
    """A validated query. Cheap enough for the event loop; images are decoded separately."""
    from eval.index.query import MAX_TEXT_CHARS

    from eval.index.rerank import MAX_RERANK_K

    max_text_chars = max_text_chars or MAX_TEXT_CHARS
    if len(body) > text_body_bytes(max_text_chars) and b'"image"' not in body:
        # a text query this large cannot hold an admissible text: refuse it without parsing
        # megabytes of JSON in the event loop
        raise BadRequest(400, f"a {len(body)}-byte body holds no image, and a text query's text is limited "
                              f"to {max_text_chars} characters (--max-text-chars)")
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest(400, "body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise BadRequest(400, 'body must be a JSON object like {"text": "a red circle", "k": 10}')
    unknown = sorted(set(payload) - {"text", "image", "k", "index", "rerank_k"})
    if unknown:
        raise BadRequest(400, f"unknown field(s): {', '.join(unknown)[:200]} (expected text or image, k, index, "
                              "rerank_k)")
    index = payload.get("index")
    if index is not None and not isinstance(index, str):
        raise BadRequest(400, "index must be the name of a served index")
    k = payload.get("k", 10)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= max_k:
        raise BadRequest(400, f"k must be an integer in 1..{max_k}")
    rerank_k = payload.get("rerank_k")
    if rerank_k is not None and (isinstance(rerank_k, bool) or not isinstance(rerank_k, int)
                                 or not 0 <= rerank_k <= MAX_RERANK_K):
        raise BadRequest(400, f"rerank_k must be an integer in 0..{MAX_RERANK_K} (0: no re-ranking)")
    text, image = payload.get("text"), payload.get("image")
    if (text is None) == (image is None):
        raise BadRequest(400, "give exactly one of 'text' or 'image'")
    if text is not None:
        return SearchQuery("text", check_text(text, max_text_chars), k, index, rerank_k)
    if not isinstance(image, str) or not image:
        raise BadRequest(400, "image must be a non-empty base64 string")
    return SearchQuery("image", image, k, index, rerank_k)


def text_body_bytes(max_text_chars: int) -> int:
    """The largest body a text query can need: every character JSON-escaped as \\uXXXX (twice
    for characters outside the BMP, which count as one), plus room for the other fields."""
    return 12 * max_text_chars + 1024


def decode_base64_image(image: str) -> bytes:
    """The bytes of a base64 image field (plain, or a data: URL straight from a browser); 400
    when it is not base64. Decoding the image itself is left to the admission checks."""
    if image.startswith("data:") and "," in image:
        image = image.split(",", 1)[1]
    try:
        return base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(400, "image is not valid base64") from None


def check_text(text, max_text_chars: int) -> str:
    """The stripped text of a text query; 400 when empty or longer than max_text_chars."""
    from eval.index.query import check_text_query

    if not isinstance(text, str) or not text.strip():
        raise BadRequest(400, "text must be a non-empty string")
    try:
        check_text_query(text, max_text_chars)
    except UserError as err:
        raise BadRequest(400, str(err)) from None
    return text.strip()
