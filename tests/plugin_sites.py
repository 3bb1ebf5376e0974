"""Third-party plugins simulated with real importlib.metadata: distributions written as dist-info folders
(METADATA + entry_points.txt) and their modules into a temporary site directory that a test puts on sys.path."""

from __future__ import annotations

import textwrap
from pathlib import Path

from lolcats_cli.core.model import registry

FM = "lolcats.feature_maps"


class Site:
    """A temporary site directory to install fake distributions into."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def add(self, dist: str, module: str, code: str, entry_points: dict[str, dict[str, str]]) -> None:
        """Write distribution ``dist`` 1.2.3 with ``module``.py and the given {group: {name: target}}."""
        info = self.root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
        sections = [f"[{group}]\n" + "".join(f"{n} = {t}\n" for n, t in eps.items())
                    for group, eps in entry_points.items()]
        (info / "entry_points.txt").write_text("\n".join(sections))
        (self.root / f"{module}.py").write_text(textwrap.dedent(code))
        registry.refresh()
