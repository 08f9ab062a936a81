"""tl_core: the one library behind the `tl` CLI, the KFP components and the pipelines."""

__version__ = "0.1.0"
