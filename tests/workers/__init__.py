"""Tests of the stock LLM workers."""
