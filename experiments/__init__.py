"""Reproductions of the papers jaxicl reimplements; run with `python -m experiments`."""
