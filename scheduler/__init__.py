"""rlinf.scheduler."""
