"""Closed forms and analytic constructions, each checked numerically in tests/."""
