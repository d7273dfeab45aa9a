"""Bundled YAML experiment configs and JSON model configs (installed as `mmssl.configs`)."""
