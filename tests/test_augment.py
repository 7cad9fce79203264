import json

import numpy as np
import pytest

from trainer.augment import PRESETS, build_augment, describe
from trainer.config import AugmentConfig


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_apply_identically_to_every_slice(preset):
    aug = build_augment(AugmentConfig(preset=preset), seed=0)
    if preset == "none":
        assert aug is None and describe(aug) == {}
        return
    rng = np.random.default_rng(0)
    one = rng.integers(0, 255, (48, 48, 1), dtype=np.uint8)
    stack = np.repeat(one, 11, axis=2)
    for _ in range(5):
        out = aug(image=stack)["image"]
        assert out.shape == stack.shape
        if preset in ("light",):  # pixel-wise random noise ops (medium/heavy) differ per channel
            assert all(np.array_equal(out[..., 0], out[..., k]) for k in range(11))
    json.dumps(describe(aug))  # serialisable: a run records exactly what ran


def test_op_lists_and_their_errors():
    cfg = AugmentConfig(ops=({"name": "HorizontalFlip", "p": 1.0},))
    aug = build_augment(cfg)
    img = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    np.testing.assert_array_equal(aug(image=img)["image"], img[:, ::-1])
    assert describe(aug)["transform"]["transforms"][0]["__class_fullname__"] == "HorizontalFlip"
    with pytest.raises(ValueError, match=r"augment.ops\[0\]: unknown op 'CroarseDropout'; did you mean CoarseDropout"):
        build_augment(AugmentConfig(ops=({"name": "CroarseDropout"},)))
    with pytest.raises(ValueError, match=r"augment.ops\[0\] \(Blur\): p must be in \[0, 1\]"):
        build_augment(AugmentConfig(ops=({"name": "Blur", "p": 2},)))
    with pytest.raises(ValueError, match="unknown preset 'lite'; did you mean light"):
        build_augment(AugmentConfig(preset="lite"))
