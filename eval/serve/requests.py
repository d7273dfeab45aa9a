"""Reading and validating `POST /search` bodies: every client mistake becomes a 4xx with a message.

The size limit is enforced while reading (a client may lie about or omit Content-Length), so an
oversized body is refused after at most `limit` bytes, never buffered whole.
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from mmssl.errors import UserError


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class SearchQuery:
    kind: str          # "text" | "image"
    value: object      # the text, or the image field as sent (see `decode_image_field`)
    k: int


async def read_limited_body(request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, f"request body over {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"request body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_search_request(body: bytes, max_k: int, has_model: bool) -> SearchQuery:
    """A validated query. Cheap enough for the event loop; images are decoded separately."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest(400, "body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise BadRequest(400, 'body must be a JSON object like {"text": "a red circle", "k": 10}')
    unknown = sorted(set(payload) - {"text", "image", "k"})
    if unknown:
        raise BadRequest(400, f"unknown field(s): {', '.join(unknown)} (expected text or image, and k)")
    k = payload.get("k", 10)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= max_k:
        raise BadRequest(400, f"k must be an integer in 1..{max_k}")
    text, image = payload.get("text"), payload.get("image")
    if (text is None) == (image is None):
        raise BadRequest(400, "give exactly one of 'text' or 'image'")
    if not has_model:
        raise BadRequest(400, "this index was built from embeddings without a model: it cannot embed queries")
    if text is not None:
        if not isinstance(text, str) or not text.strip():
            raise BadRequest(400, "text must be a non-empty string")
        return SearchQuery("text", text.strip(), k)
    if not isinstance(image, str) or not image:
        raise BadRequest(400, "image must be a non-empty base64 string")
    return SearchQuery("image", image, k)


def decode_image_field(image: str) -> object:
    """base64 (or a data: URL) -> PIL image; slow for big images, so callers run it in a thread."""
    from eval.index.query import decode_image

    if image.startswith("data:") and "," in image:  # a data: URL straight from a browser
        image = image.split(",", 1)[1]
    try:
        data = base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(400, "image is not valid base64") from None
    try:
        return decode_image(data)
    except UserError:
        raise BadRequest(400, "image is not a readable image (JPEG, PNG, WebP, ...)") from None
