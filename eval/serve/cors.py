"""CORS, off unless `--cors-origin` names origins: Starlette's CORSMiddleware with JSON refusals.

Without CORS headers a browser lets no other site read the service's answers; with them, only
the named origins may (GET and POST, the Content-Type header; the not-applied header of
clip-retrieval answers is exposed to their scripts). A refused preflight is answered
with the service's usual `{"error": ...}` body instead of Starlette's plain text.
"""
from __future__ import annotations

from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse


class JSONCORSMiddleware(CORSMiddleware):
    def preflight_response(self, request_headers):
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        reason = response.body.decode("utf-8", errors="replace")
        return JSONResponse({"error": f"CORS preflight refused: {reason}"}, status_code=response.status_code,
                            headers={"Vary": "Origin"})


def cors_options(origins) -> dict:
    from eval.serve.clip_retrieval import NOT_APPLIED_HEADER

    return {"allow_origins": list(origins), "allow_methods": ["GET", "POST"], "allow_headers": ["Content-Type"],
            "expose_headers": [NOT_APPLIED_HEADER], "max_age": 600}
