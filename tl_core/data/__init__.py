"""Data: sources by URI, the prepare step, prepared datasets and k-shot sampling."""

from tl_core.data.prepare import PreparedDataset, load_manifest, load_prepared, normalise, prepare, sample_shots

__all__ = ["PreparedDataset", "load_manifest", "load_prepared", "normalise", "prepare", "sample_shots"]
