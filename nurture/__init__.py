"""nurture: score leads, move them through a lifecycle, send templated nurture sequences."""

__version__ = "0.1.0"
