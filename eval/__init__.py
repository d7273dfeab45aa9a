"""Evaluation of dual encoders: zero-shot classification, retrieval, linear probe, search indexes.

Modules: `metrics` (CLIP_benchmark metric definitions, exact and tie-deterministic), `embed`
(model loading and batched feature extraction), `templates` (class names and prompts),
`zeroshot`, `retrieval`, `linear_probe`, `cli` (`mmssl eval ...`), `index` / `serve` (search).
Nothing heavy is imported here, so `mmssl --help` stays fast.
"""
