"""rlinf.envs."""
