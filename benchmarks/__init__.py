"""Timings of jaxicl: each module is run as `python -m benchmarks.NAME` and writes JSON + a table."""

import argparse


def argument_parser(module: str, doc: str) -> argparse.ArgumentParser:
    """The parser of `python -m {module}`: its --help describes the command by the first paragraph of `doc` (the
    module's docstring)."""
    return argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0])
