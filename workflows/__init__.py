"""rlinf.workflows."""
