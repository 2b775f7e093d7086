"""rlinf.models."""
