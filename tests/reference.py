"""Import open_clip (CPU torch) as an independent reference, or skip with the reason.

torchvision has no CPU build on our registries; the CUDA-built wheel imports on CPU torch once its two
custom op schemas exist (open_clip never calls them), so we register them first.
"""

from __future__ import annotations

import pytest


def import_open_clip():
    try:
        import torch
    except Exception as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"torch is not installable here: {e}")
    try:
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import_open_clip._keepalive = lib  # the Library object must outlive the import
    except RuntimeError:
        pass  # already defined (real torchvision ops, or a second call)
    try:
        import open_clip
    except Exception as e:  # pragma: no cover
        pytest.skip(f"open_clip is not importable here: {e}")
    return open_clip, torch
