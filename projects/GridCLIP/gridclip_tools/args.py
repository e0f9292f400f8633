"""Command-line pieces shared by the tools."""

from __future__ import annotations

import argparse
import math
import os
import re
from typing import List, Sequence

__all__ = [
    "add_config_overrides",
    "add_evaluated_model",
    "check_weights_file",
    "config_overrides",
    "non_negative_int",
    "positive_float",
    "positive_int",
    "split_trailing_opts",
    "weights_in_opts",
]


#: The config the user-facing tools default to: the model `make demo` trains.
DEFAULT_CONFIG = "embedded/GridCLIP_world.yaml"


def add_config_file(parser: argparse.ArgumentParser, default: str = DEFAULT_CONFIG) -> None:
    """``--config-file FILE``: a path or a name under projects/GridCLIP/configs."""
    parser.add_argument(
        "--config-file",
        default=default,
        metavar="FILE",
        help=f"config path or name under projects/GridCLIP/configs (default {default})",
    )


def add_evaluated_model(parser: argparse.ArgumentParser) -> None:
    """``--config-file``, ``--weights``, ``--dataset`` and ``--num-images``: a trained model run
    over a registered dataset (the evaluation commands)."""
    add_config_file(parser)
    parser.add_argument(
        "--weights", help="trained checkpoint (same as the opts MODEL.WEIGHTS FILE)"
    )
    parser.add_argument(
        "--dataset", help="registered dataset (default: the config's DATASETS.TEST[0])"
    )
    parser.add_argument(
        "--num-images", type=int, default=0, help="the first N images only (0: all)"
    )


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


_CONFIG_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$")


def split_trailing_opts(args: argparse.Namespace, attr: str = "input") -> None:
    """``--input a.png b.png MODEL.WEIGHTS m.pth``: a ``nargs="+"``/``"*"`` option swallows the
    trailing config overrides; move everything from its first config key (``SECTION.KEY``, not an
    existing file) on to ``args.opts``. Every tool with such an option calls this after parsing."""
    items = list(getattr(args, attr) or [])
    for i, item in enumerate(items):
        if _CONFIG_KEY.match(str(item)) and not os.path.exists(item):
            args.opts = items[i:] + list(getattr(args, "opts", None) or [])
            setattr(args, attr, items[:i])
            return


def config_overrides(args: argparse.Namespace) -> List[str]:
    """The trailing overrides, then those after ``--opts``."""
    return list(args.opts or []) + list(args.extra_opts or [])


def _number(text: str, kind, what: str):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (0, negative and non-integers refused)."""
    value = _number(text, int, "a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: a whole number >= 0."""
    value = _number(text, int, "a whole number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must not be negative")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0 (NaN, inf, 0 and negative refused)."""
    value = _number(text, float, "a number")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be greater than 0")
    return value


def weights_in_opts(opts: Sequence[str]) -> List[str]:
    """The values of ``MODEL.WEIGHTS`` in config overrides ``KEY VALUE ...`` (last one wins)."""
    return [str(opts[i + 1]) for i in range(0, len(opts) - 1, 2) if opts[i] == "MODEL.WEIGHTS"]


def check_weights_file(path: str, where: str = "MODEL.WEIGHTS") -> None:
    """A local checkpoint that does not exist is an error naming the path and where it was given
    (fvcore would stop later with a bare ``AssertionError: Checkpoint ... not found!``); URLs
    (``detectron2://``, ``https://``) are left to Detectron2's path manager."""
    if path and "://" not in path and not os.path.isfile(os.path.expanduser(path)):
        raise FileNotFoundError(
            f"{where}: checkpoint {path!r} does not exist (absolute path "
            f"{os.path.abspath(os.path.expanduser(path))!r}); train a model first or pass the "
            "path of a .pth file"
        )
