"""rlinf.algorithms."""
