"""Command-line pieces shared by the tools."""

from __future__ import annotations

import argparse
from typing import List

__all__ = ["add_config_overrides", "config_overrides"]


def add_config_overrides(parser: argparse.ArgumentParser, scope: str = "") -> None:
    """Config overrides ``KEY VALUE ...`` as trailing arguments, or after ``--opts`` (Detectron2's
    demo spelling); :func:`config_overrides` joins the two. ``scope`` ends the help text (e.g.
    ``" for every run"``)."""
    parser.add_argument(
        "--opts",
        dest="extra_opts",
        nargs=argparse.REMAINDER,
        default=[],
        help=f"config overrides KEY VALUE ...{scope} (Detectron2's demo spelling)",
    )
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, help=f"config overrides KEY VALUE ...{scope}"
    )


def config_overrides(args: argparse.Namespace) -> List[str]:
    """The trailing overrides, then those after ``--opts``."""
    return list(args.opts or []) + list(args.extra_opts or [])
