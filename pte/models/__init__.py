"""Base models: loading by name or path (load.py), the tiny in-process models (tiny.py), the toy base (toy.py)."""
