"""aem-dist: distributed, streaming, resumable AEM training for attention-based MIL on WSI feature bags."""

__version__ = "0.1.0"
