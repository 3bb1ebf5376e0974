"""The training and held-out text of ``benchmarks/quality.py``: the Python documentation, split by section.

Training text: the library reference, the language reference, the C API and the what's-new pages. Held-out text
(never trained on): the tutorial, the HOWTOs and the FAQ. Both come from the reStructuredText sources that the
Debian package ``python3.11-doc`` ships (no network needed beyond the Debian mirror):

    apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb /tmp/pydoc
    python benchmarks/pydoc_corpus.py /tmp/pydoc --out data/
    # -> data/train.txt (about 9.2 MB) and data/heldout.txt (about 1.1 MB)

Files are read in sorted order, so the same package gives the same bytes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TRAIN = ("library", "reference", "c-api", "whatsnew")
HELDOUT = ("tutorial", "howto", "faq")


def sources_dir(root: Path) -> Path:
    """The ``_sources`` folder under ``root`` (the extracted package, or the folder itself)."""
    if root.name == "_sources" and root.is_dir():
        return root
    found = sorted(root.glob("**/html/_sources"))
    if not found:
        raise SystemExit(f"no html/_sources folder under {root}: extract the python3.X-doc package there first "
                         "(apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb DIR)")
    return found[0]


def section_text(sources: Path, sections: tuple[str, ...]) -> str:
    """Every ``.rst.txt`` file of ``sections``, in sorted order, separated by blank lines."""
    parts = []
    for section in sections:
        files = sorted((sources / section).glob("**/*.rst.txt"))
        if not files:
            raise SystemExit(f"section {section!r} has no .rst.txt files under {sources}")
        parts += [f.read_text(encoding="utf-8") for f in files]
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path, help="the extracted python3.X-doc package (or its html/_sources folder)")
    p.add_argument("--out", type=Path, default=Path("."), help="folder for train.txt and heldout.txt")
    args = p.parse_args(argv)
    sources = sources_dir(args.root)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, sections in (("train", TRAIN), ("heldout", HELDOUT)):
        text = section_text(sources, sections)
        (args.out / f"{name}.txt").write_text(text, encoding="utf-8")
        print(f"{args.out / f'{name}.txt'}: {len(text):,} characters from {', '.join(sections)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
