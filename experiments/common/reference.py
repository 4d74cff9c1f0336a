"""Published numbers the experiments compare with: experiments/reference/NAME.json, each with its provenance."""

import json
import os

DIRECTORY = os.path.join(os.path.dirname(__file__), os.pardir, "reference")


def load(name: str) -> dict:
    """The contents of experiments/reference/<name>.json (keys "source", "what" and the numbers)."""
    with open(os.path.join(DIRECTORY, f"{name}.json")) as f:
        return json.load(f)
