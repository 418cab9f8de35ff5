"""Structured output for the embedded engine: JSON schema → llama.cpp grammar (GBNF), tool-call text."""
