"""SigLIP loss on the MetaCLIP recipe: same data, model, schedule and optimizer as configs/metaclip.py,
only the objective changes (sigmoid loss, normalised by B).

Choice of the logit parameters: SigLIP's own initialisation (Zhai et al. 2023, big_vision ``siglip.py``):
``logit_scale`` (log space) = ln 10 (scale 10) and ``logit_bias`` = -10. The scale stays clamped to
[0, ln 100] after each update as in the CLIP recipe. SigLIP's paper also changes the optimizer
(lr 1e-3, wd 1e-4, b2 0.95); we keep MetaCLIP's so that a comparison isolates the loss; override with
``--config.optimizer.*`` to follow the paper.

    variants: b32_400m (default), b16_400m, l14_400m, ... (every configs/metaclip.py variant)
"""

import importlib.util
import math
import os

_spec = importlib.util.spec_from_file_location(
    "_metaclip_recipe", os.path.join(os.path.dirname(os.path.abspath(__file__)), "metaclip.py"))
_metaclip = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_metaclip)


def get_config(arg: str | None = None):
    config = _metaclip.get_config(arg or "b32_400m")
    config.loss.name = "siglip"
    config.model.init_logit_scale = math.log(10.0)
    config.model.init_logit_bias = -10.0
    return config
