"""Nothing silent (issue 14): images of any kind given to the predictor and the demo, the demo
keeping what it did, tools' numeric options and missing weights, pickled CLIP modules, file
modes. Each test injects a fault that ``main`` (ba4ce31) absorbed or reported confusingly (see
docs/RELIABILITY.md)."""

import json
import os
import stat

import numpy as np
import pytest
import tiny_models
import torch

from gridclip.clip import CLIPWeightsError, load_clip

D, K = 64, 5


# ------------------------------------------------------------------------- CLIP weights files
def test_a_pickled_module_as_clip_weights_gets_its_own_message(assets, tmp_path):
    path = tmp_path / "clip_module.pt"
    torch.save(assets["model"], path)  # the whole module, not its state dict
    with pytest.raises(CLIPWeightsError) as e:
        load_clip(str(path))
    message = str(e.value)
    assert str(path) in message and "pickled model (torch.save(model)" in message
    assert "clip.model.CLIP" in message and "torch.save(model.state_dict()" in message
    assert "truncated or corrupt" not in message
    torch.save({"weights": torch.zeros(2), "optimizer": torch.optim.SGD}, tmp_path / "other.pt")
    with pytest.raises(CLIPWeightsError, match=r"holds pickled Python objects \(\['torch.optim"):
        load_clip(str(tmp_path / "other.pt"))
