"""visiontune-models: the architectures visiontune can train, by source, filtered by a name pattern.

The presets (model=resnet, ...) have hand-written heads and layer groups; model=torchvision and
model=timm take any name listed here (model.arch=NAME) and find theirs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

SOURCES = ("presets", "torchvision", "timm")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="visiontune-models", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source",
        choices=SOURCES,
        action="append",
        help="list this source's models (repeatable; default: all, timm where it is installed)",
    )
    parser.add_argument("--filter", default="*", help="a glob on the name, e.g. 'convnext*' (quote it)")
    args = parser.parse_args(argv)

    from visiontune import VisiontuneError

    try:
        for source in args.source or _default_sources():
            for line in _lines(source, args.filter):
                print(line)
    except VisiontuneError as err:
        print(f"visiontune-models: error: {err}", file=sys.stderr)
        return 1
    return 0


def _default_sources() -> tuple[str, ...]:
    import importlib.util

    return SOURCES if importlib.util.find_spec("timm") else SOURCES[:2]


def _lines(source: str, pattern: str) -> list[str]:
    """One line per model: how to pick it on the visiontune-train command line."""
    import fnmatch

    from visiontune import catalog, config

    if source == "presets":
        presets = fnmatch.filter(config.model_names(), pattern)
        return [f"model={name}" for name in presets]
    return [f"model={source} model.arch={name}" for name in catalog.names(source, pattern)]


if __name__ == "__main__":
    sys.exit(main())
