from __future__ import annotations

import os
from pathlib import Path

from scarlet_deploy.runtime.core.errors import ScarletError

README_BEGIN, README_END = "<!-- scarlet bench: begin -->", "<!-- scarlet bench: end -->"


def update_readme(path: str | os.PathLike, markdown: str) -> None:
    """Replace the performance section between the markers (docs/performance.md), nothing else."""
    from scarlet_deploy.runtime.core.artifacts import write_bytes_atomic

    text = Path(path).read_text()
    if README_BEGIN not in text or README_END not in text or text.index(README_BEGIN) > text.index(README_END):
        raise ScarletError(f"{path} has no performance section to replace; add the two lines {README_BEGIN} and "
                           f"{README_END} where the table belongs.")
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    write_bytes_atomic(path, f"{head}{README_BEGIN}\n{markdown.rstrip()}\n{README_END}{tail}".encode())
