"""Every limit and switch of the search service in one place, with its default.

`mmssl serve` fills these from its flags (see `eval.serve.register`); tests build them directly.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from mmssl.data.image_guard import ImageLimits
from eval.index.query import MAX_TEXT_CHARS

MAX_BODY_BYTES = 10 * 2**20


@dataclass(frozen=True)
class ServeOptions:
    bind_host: str = "127.0.0.1"          # the Host header must name it (see `eval.serve.hosts`)
    allowed_hosts: tuple = ()             # more names the Host header may carry (--allowed-host)
    cors_origins: tuple = ()              # CORS stays off unless origins are given (--cors-origin)
    max_batch: int = 32                   # queries embedded in one forward pass
    max_queue: int = 256                  # queries waiting for the worker; beyond: 503 + Retry-After
    request_timeout: float = 30.0         # seconds from a complete body to the answer; beyond: 504
    body_timeout: float = 10.0            # seconds to receive a body; beyond: 408 and the connection closes
    max_body_bytes: int = MAX_BODY_BYTES  # one body; beyond: 413
    max_body_bytes_in_flight: int = 4 * MAX_BODY_BYTES   # all bodies being read or parsed; beyond: 503
    max_text_chars: int = MAX_TEXT_CHARS  # beyond: 400
    image_limits: ImageLimits = field(default_factory=ImageLimits)   # beyond: 413
    # query images decoded at once (each may take ~50 MB): half the cores, so that decoding leaves
    # the event loop and the query worker CPU to answer with
    image_decoders: int = max(1, min(4, (os.cpu_count() or 2) // 2))
    restart_delay: float = 0.5            # seconds before a dead query worker is restarted
    allow_image_urls: bool = False        # fetch clip-retrieval `image_url` queries (--allow-image-urls)
    image_url_timeout: float = 10.0       # seconds to fetch one image URL; beyond: 504
    rerank: str | None = None             # "itm": text queries' top rerank_k reordered by the ITM head (--rerank)
    rerank_k: int = 16                    # candidates re-ranked when a request does not say (--rerank-k)
    allow_remote_reload: bool = False     # answer POST /reload from non-loopback clients (--allow-remote-reload)
    reload_on_sighup: bool = False        # SIGHUP reloads the folders (`mmssl serve` sets it; needs the main thread)
