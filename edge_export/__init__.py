"""edge-export: quantize, lower, verify and benchmark distilled reasoning models for edge devices."""
__version__ = "0.1.0"
