"""`tl register`, `tl promote`, `tl rollback`: the MLflow model registry commands (issue 5)."""

from tl_core.cli import app  # noqa: F401  (commands are added to the one `tl` app)
