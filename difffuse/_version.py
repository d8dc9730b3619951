"""The package version, in a module of its own so the pass can hash it without importing
`difffuse/__init__` (which imports the backend)."""
__version__ = "0.1.0"
