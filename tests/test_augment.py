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


@pytest.mark.parametrize("op,args,message", [
    ("GaussNoise", {"var_limit": [10, 50]}, r"argument 'var_limit' .* replaced it with std_range"),
    ("CoarseDropout", {"max_holes": 8, "max_height": 16, "max_width": 16},
     r"argument 'max_holes' .* replaced it with num_holes_range"),
    ("ShiftScaleRotate", {"shift_limit": 0.1, "value": 0}, r"argument 'value' .* replaced it with fill"),
    ("OpticalDistortion", {"distort_limit": 0.1, "shift_limit": 0.1}, r"argument 'shift_limit' .* removed it, with no replacement"),
    ("Blur", {"blur_limit": 3, "always_apply": True}, r"argument 'always_apply' .* replaced it with p=1"),
    ("Blur", {"blur_limt": 3}, r"argument 'blur_limt' .*; did you mean blur_limit\?"),
    ("RandomBrightnessContrast", {"brightness": 0.2}, r"argument 'brightness' is not accepted"),
])
def test_an_argument_albumentations_does_not_take_is_an_error_naming_op_and_argument(op, args, message):
    """albumentations 2 only warns and uses its default for such an argument: the run would say
    one thing in its params and do another."""
    with pytest.raises(ValueError, match=rf"augment.ops\[1\] \({op}\): {message}"):
        build_augment(AugmentConfig(ops=({"name": "HorizontalFlip"}, {"name": op, "p": 0.5, **args})))


def test_a_value_albumentations_rejects_is_one_line():
    with pytest.raises(ValueError, match=r"augment.ops\[0\] \(Blur\): .*blur_limit") as e:
        build_augment(AugmentConfig(ops=({"name": "Blur", "blur_limit": "x"},)))
    assert "\n" not in str(e.value)


def test_stale_arguments_translate_where_the_meaning_carries_over():
    from trainer.augment import translate_v1

    args, kept = translate_v1("GaussNoise", {"var_limit": (10, 50), "p": 0.3})
    assert kept == {} and args["p"] == 0.3
    assert args["std_range"] == pytest.approx((10 ** 0.5 / 255, 50 ** 0.5 / 255), abs=1e-6)
    args, kept = translate_v1("CoarseDropout", {"max_holes": 8, "max_height": 0.2, "min_width": 4, "max_width": 16})
    assert args == {"num_holes_range": (8, 8), "hole_height_range": (0.2, 0.2), "hole_width_range": (4, 16)}
    args, kept = translate_v1("OpticalDistortion", {"distort_limit": 0.1, "shift_limit": 0.1})
    assert args == {"distort_limit": 0.1} and kept == {"shift_limit": 0.1}
    for op, given in (("GaussNoise", {"var_limit": (10, 50)}), ("CoarseDropout", {"max_holes": 2, "max_height": 0.2})):
        built = build_augment(AugmentConfig(ops=({"name": op, **translate_v1(op, given)[0]},)))
        assert built is not None  # the translation is accepted by the installed albumentations


def test_every_stale_argument_of_an_op_is_named_with_its_replacement():
    from trainer.augment import build_augment
    from trainer.config import ConfigError, TrainConfig

    cfg = TrainConfig.from_dict({"augment": {"ops": [
        {"name": "CoarseDropout", "max_holes": 8, "max_height": 16, "max_width": 16}]}})
    with pytest.raises(ConfigError) as e:
        build_augment(cfg.augment)
    for old, new in (("max_holes", "num_holes_range"), ("max_height", "hole_height_range"),
                     ("max_width", "hole_width_range")):
        assert f"argument {old!r} is not accepted" in str(e.value) and new in str(e.value)
