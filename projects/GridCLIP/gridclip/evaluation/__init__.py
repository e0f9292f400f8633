from .lvis_compat import patch_lvis_for_numpy2

patch_lvis_for_numpy2()

__all__ = ["patch_lvis_for_numpy2"]
