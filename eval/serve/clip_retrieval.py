"""clip-retrieval's back-end protocol, so that its `ClipClient` and its web front work unchanged.

    POST /knn-service  {"text" | "image" (base64) | "image_url" | "embedding_input": [floats],
                        "modality": "image"|"text", "num_images", "num_result_ids", "indice_name",
                        "deduplicate", "use_safety_model", "use_violence_detector", "use_mclip",
                        "aesthetic_score", "aesthetic_weight"}   (unused inputs arrive as null)
                       -> [{"id", "similarity", "caption", "url"?, "image_path"?, ..., "image"?}, ...]
    POST /metadata     {"ids": [...], "indice_name"} -> [{"id", "metadata": {...}}, ...]
    GET  /indices-list -> ["name", ...]
    GET  /config.json  -> {"defaultBackend", "defaultIndex", "urlColumn"} for the front

The answer is a bare JSON array in score order; only the first `num_images` results carry
metadata (and the stored image as base64, as clip-retrieval sends it), the rest only `id` and
`similarity`, which the front completes through `/metadata` as it scrolls. `modality` says what is
searched: the images, or the captions (an index built with `--modality image,text`).

ClipClient sends its body with no Content-Type and the front as text/plain, so these routes read
the raw body whatever it is declared as (a cross-site page could therefore make a browser post a
query, but never read the answer without `--cors-origin`; the queue and the body budget bound
what such posts cost). Options mmssl has no model for (safety, violence, multilingual CLIP,
aesthetic embeddings) are accepted and never applied; each answer that asked for one says so in
the `X-Mmssl-Not-Applied` header, and `/health` counts them. Every limit of `/search` applies.
"""
from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass, field

import anyio
import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse

from eval.serve.requests import BadRequest, check_text
from eval.serve.service import UNSUPPORTED_OPTIONS, ServedIndex, Service

MAX_RESULT_IDS = 10_000      # the front asks for 3000 ids, and 10000 for its download button
MAX_NUM_IMAGES = 1000        # results that carry metadata and a base64 image
MAX_METADATA_IDS = 1000      # ids in one /metadata request
NOT_APPLIED_HEADER = "X-Mmssl-Not-Applied"
INTERNAL_COLUMNS = ("shard", "image_offset", "image_size")   # where a stored image sits: not metadata
QUERY_FIELDS = ("text", "image", "image_url", "embedding_input")


@dataclass
class KnnQuery:
    kind: str                # "text" | "image" | "image_url" | "vector"
    value: object
    modality: str            # the index searched
    num_images: int
    num_result_ids: int
    index: str | None
    deduplicate: bool
    not_applied: list = field(default_factory=list)


def parse_knn_request(body: bytes, max_text_chars: int) -> KnnQuery:
    """A validated /knn-service query (the vector is checked against the index later)."""
    payload = _json_object(body, '{"text": "a red circle", "modality": "image", "num_images": 40, '
                                 '"indice_name": "NAME"}')
    given = [name for name in QUERY_FIELDS if payload.get(name) not in (None, "")]
    if len(given) != 1:
        raise BadRequest(400, f"give exactly one of text, image, image_url or embedding_input (got "
                              f"{', '.join(given) or 'none'})")
    name = given[0]
    value = payload[name]
    if name == "text":
        kind, value = "text", check_text(value, max_text_chars)
    elif name in ("image", "image_url"):
        if not isinstance(value, str):
            raise BadRequest(400, f"{name} must be a string")
        kind = name
    else:
        kind, value = "vector", _embedding(value)
    modality = payload.get("modality") or "image"
    if modality not in ("image", "text"):
        raise BadRequest(400, "modality must be 'image' (search the images) or 'text' (search the captions)")
    num_images = _count(payload, "num_images", 40, MAX_NUM_IMAGES)
    num_result_ids = _count(payload, "num_result_ids", num_images, MAX_RESULT_IDS)
    return KnnQuery(kind, value, modality, num_images, num_result_ids, _index_name(payload),
                    _flag(payload, "deduplicate"), _not_applied(payload))


def parse_metadata_request(body: bytes) -> tuple[list[int], str | None]:
    payload = _json_object(body, '{"ids": [0, 1, 2], "indice_name": "NAME"}')
    ids = payload.get("ids")
    if not isinstance(ids, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise BadRequest(400, "ids must be a list of integer ids")
    if len(ids) > MAX_METADATA_IDS:
        raise BadRequest(400, f"at most {MAX_METADATA_IDS} ids per request, got {len(ids)}")
    return ids, _index_name(payload)


def _index_name(payload: dict) -> str | None:
    """`indice_name`, or None for the default index ("" and null alike)."""
    index = payload.get("indice_name")
    if index is not None and not isinstance(index, str):
        raise BadRequest(400, "indice_name must be the name of a served index (GET /indices-list)")
    return index or None


def _json_object(body: bytes, example: str) -> dict:
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest(400, "body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise BadRequest(400, f"body must be a JSON object like {example}")
    return payload


def _count(payload: dict, name: str, default: int, most: int) -> int:
    value = payload.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise BadRequest(400, f"{name} must be an integer in 1..{most}")
    return value


def _flag(payload: dict, name: str) -> bool:
    value = payload.get(name)
    if value is not None and not isinstance(value, bool):
        raise BadRequest(400, f"{name} must be true, false or null")
    return bool(value)


def _not_applied(payload: dict) -> list[str]:
    """The options asked for that mmssl cannot honour (clip-retrieval applies aesthetics only for
    a non-empty aesthetic_score)."""
    for name in ("use_safety_model", "use_violence_detector", "use_mclip"):
        _flag(payload, name)
    score, weight = payload.get("aesthetic_score"), payload.get("aesthetic_weight")
    for name, value in (("aesthetic_score", score), ("aesthetic_weight", weight)):
        if value not in (None, "") and not _is_number(value):
            raise BadRequest(400, f"{name} must be a number, a numeric string, \"\" or null")
    asked = {"use_safety_model": bool(payload.get("use_safety_model")),
             "use_violence_detector": bool(payload.get("use_violence_detector")),
             "use_mclip": bool(payload.get("use_mclip")),
             "aesthetic_score": score not in (None, "")}
    return [name for name in UNSUPPORTED_OPTIONS if asked[name]]


def _is_number(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return math.isfinite(value)
    if isinstance(value, str) and len(value) <= 32:
        try:
            return math.isfinite(float(value))
        except ValueError:
            return False
    return False


def _embedding(value) -> np.ndarray:
    """A finite, non-zero list of numbers as a float32 unit row (the index holds unit vectors, so
    similarities stay cosines)."""
    if not isinstance(value, list) or not value or any(isinstance(x, bool) or not isinstance(x, (int, float))
                                                       for x in value):
        raise BadRequest(400, "embedding_input must be a non-empty list of numbers")
    vector = np.asarray(value, dtype=np.float64)
    norm = float(np.linalg.norm(vector)) if np.isfinite(vector).all() else math.nan
    if not math.isfinite(norm) or norm == 0:
        raise BadRequest(400, "embedding_input must be finite and not all zeros")
    return (vector / norm).astype(np.float32)


# ---------------------------------------------------------------- answers


def metadata_record(served: ServedIndex, i: int) -> dict:
    """Row i as clip-retrieval shows it: caption, key, the row's own columns (url, image_path, ...;
    not where a stored image sits), and the stored image as base64 when it can be served."""
    metadata = served.folder.metadata
    record = {"caption": metadata.captions[i], "key": metadata.keys[i]}
    for name, values in metadata.columns.items():
        if name not in INTERNAL_COLUMNS and values[i] is not None:
            record[name] = _plain(values[i])
    stored = served.images.read(i) if served.images.has(i) else None
    if stored is not None:
        record["image"] = base64.b64encode(stored[0]).decode("ascii")
    return record


def _plain(value):
    """A metadata value JSON can carry (bytes as text, anything exotic as its string)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def knn_results(served: ServedIndex, hits: list, num_images: int) -> list[dict]:
    results = []
    for position, hit in enumerate(hits):
        result = metadata_record(served, hit.id) if position < num_images else {}
        result.update({"id": hit.id, "similarity": hit.score})
        results.append(result)
    return results


def add_clip_retrieval_routes(app, service: Service) -> None:
    options = service.options

    def not_applied_headers(names: list[str]) -> dict:
        service.not_applied.update(names)
        return {NOT_APPLIED_HEADER: ", ".join(names)} if names else {}

    @app.post("/knn-service")
    async def knn_service(request: Request):
        reservation = service.reservation()
        try:
            body = await service.read_body(request, reservation)
            query = parse_knn_request(body, options.max_text_chars)
            del body
            served = _checked(service, query)
            deadline = service.deadline()
            kind, value = await service.prepare(served, query.kind, query.value, reservation, deadline)
            hits = await service.answer(request, served, kind, value, query.num_result_ids, deadline,
                                        query.modality, query.deduplicate)
        finally:
            reservation.release()
        results = await anyio.to_thread.run_sync(knn_results, served, hits, query.num_images)
        return JSONResponse(results, headers=not_applied_headers(query.not_applied))

    @app.post("/metadata")
    async def metadata(request: Request):
        reservation = service.reservation()
        try:
            ids, name = parse_metadata_request(await service.read_body(request, reservation))
        finally:
            reservation.release()
        served = service.index(name)
        count = served.folder.info["count"]
        outside = next((i for i in ids if not 0 <= i < count), None)
        if outside is not None:
            raise BadRequest(400, f"id {outside} is not in index {served.name!r} (ids are 0..{count - 1})")
        records = await anyio.to_thread.run_sync(lambda: [metadata_record(served, i) for i in ids])
        return JSONResponse([{"id": i, "metadata": record} for i, record in zip(ids, records)])

    @app.get("/indices-list")
    async def indices_list():
        return list(service.indexes)

    @app.get("/config.json")
    async def config(request: Request):
        # the Host header has passed the host check, so this names this service as its client reached it
        return {"defaultBackend": str(request.base_url).rstrip("/"), "defaultIndex": service.default.name,
                "urlColumn": "url"}


def _checked(service: Service, query: KnnQuery) -> ServedIndex:
    """The index the query names, after checking that it can answer this kind of query."""
    served = service.index(query.index)
    if query.modality not in served.folder.modalities:
        raise BadRequest(400, f"index {served.name!r} has no caption index for modality 'text'; build it with "
                              "`mmssl index build --modality image,text`")
    if query.kind == "vector" and len(query.value) != served.searcher.dim:
        raise BadRequest(400, f"embedding_input has {len(query.value)} numbers; index {served.name!r} holds "
                              f"{served.searcher.dim}-d vectors")
    if query.kind in ("text", "image", "image_url") and served.searcher.encoder is None:
        raise BadRequest(400, f"index {served.name!r} was built from embeddings without a model: it can only "
                              "answer embedding_input queries")
    if query.kind == "image_url" and not service.options.allow_image_urls:
        raise BadRequest(400, "this service does not fetch image URLs (start it with --allow-image-urls); "
                              "send the image itself as base64 in 'image'")
    return served
