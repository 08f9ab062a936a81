"""`tl pipeline ...` commands (added to the one `tl` app when imported)."""

from tl_core.cli import app  # noqa: F401
