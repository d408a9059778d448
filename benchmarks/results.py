"""What every benchmark's ``--json`` option does."""

from __future__ import annotations

import json
from typing import Any


def write_json(path: str | None, result: Any) -> None:
    """Write ``result`` as indented JSON to ``path``; nothing when no path was given."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
