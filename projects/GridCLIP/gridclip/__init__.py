"""GridCLIP for Detectron2: one-stage open-vocabulary detection with grid-level CLIP alignment.

Importing the package registers the models (``GridCLIP`` meta-architecture, ViLD ROI heads, the
CLIP ResNet backbone) and the datasets (LVIS v1 OVD split, the embedded world). Registration is
idempotent.
"""

from . import evaluation  # noqa: F401  (lvis numpy-2 compatibility, applied once)
from . import data, modeling  # noqa: F401  (registers datasets and models)
from .config import add_gridclip_config, get_gridclip_cfg

__version__ = "0.1.0"

__all__ = ["add_gridclip_config", "get_gridclip_cfg", "__version__"]
