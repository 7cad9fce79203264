"""Pretrained backbone weights, found once: a weights folder the user names (`model.weights_dir`),
the Hugging Face cache (or torch hub's, for weights timm fetches by URL), or one download attempt
from the hub into that cache. What is found is handed to timm as a file
(``pretrained_cfg_overlay=dict(file=...)``), so building a model never goes to the network again.

A study resolves every backbone its space can sample before the first trial (`resolve_weights`);
a backbone without weights is refused in one line that lists the ways to provide them. Kaggle
notebooks run with the internet off and bring weights as an attached dataset: point
`model.weights_dir` at it (files ``<backbone>.safetensors`` / ``.pth`` / ``.bin``, or
``<backbone>/model.safetensors``), or copy a filled Hugging Face cache and set ``HF_HOME`` and
``HF_HUB_OFFLINE=1``.
"""
from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import UserError

__all__ = ["PretrainedUnavailable", "check_loadable", "check_pretrained", "local_weights", "resolve_weights"]

HUB_TIMEOUT = 5.0  # seconds: the one probe of the hub before a download is attempted
_FILES = ("{}.safetensors", "{}.pth", "{}.bin", "{}.pt", "{}/model.safetensors", "{}/pytorch_model.bin")
_HF_FILES = ("model.safetensors", "pytorch_model.bin")


class PretrainedUnavailable(UserError):
    """Pretrained weights were asked for and cannot be had (no network, unknown tag...)."""


def _names(backbone: str) -> list[str]:
    """The names a weights file may go by: as configured, with timm's default tag, the bare
    architecture."""
    cfg = _pretrained_cfg(backbone)
    tagged = cfg.hf_hub_id.split("/")[-1] if cfg is not None and cfg.hf_hub_id else None
    return list(dict.fromkeys(n for n in (backbone, tagged, backbone.split(".")[0]) if n))


def _pretrained_cfg(backbone: str):
    from timm.models import get_pretrained_cfg

    try:
        return get_pretrained_cfg(backbone)
    except Exception:  # a name timm knows but without any pretrained config
        return None


def _hf_cache() -> Path:
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path(constants.HF_HUB_CACHE)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in (
        "1", "true", "yes", "on")


def _endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def _torch_hub_file(url: str) -> Path:
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])


def local_weights(backbone: str, weights_dir: str | Path | None = None) -> Path | None:
    """The weights file of a timm backbone already on this machine, or None; never the network.
    Looked for in order: `weights_dir` (``<name>.safetensors``, ``.pth``, ``.bin``, ``.pt`` or
    ``<name>/model.safetensors``, ``<name>/pytorch_model.bin``, where name is the backbone as
    configured, with timm's default tag, or the bare architecture), the Hugging Face cache
    (``$HF_HUB_CACHE``, ``$HF_HOME/hub``, ``~/.cache/huggingface/hub``), torch hub's cache."""
    if weights_dir:
        folder = Path(weights_dir)
        for name in _names(backbone):
            for pattern in _FILES:
                if (folder / pattern.format(name)).is_file():
                    return folder / pattern.format(name)
    cfg = _pretrained_cfg(backbone)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo = cfg.hf_hub_id.split("@")[0]
        for filename in ([cfg.hf_hub_filename] if cfg.hf_hub_filename else _HF_FILES):
            hit = try_to_load_from_cache(repo, filename, cache_dir=_hf_cache())
            if isinstance(hit, str):
                return Path(hit)
    if cfg.url and _torch_hub_file(cfg.url).is_file():
        return _torch_hub_file(cfg.url)
    return None


def _download(backbone: str) -> Path:
    """One attempt to fetch the backbone's weights into the cache (the hub probed first within
    `HUB_TIMEOUT` seconds, so an unreachable hub costs seconds, not minutes of retries)."""
    cfg = _pretrained_cfg(backbone)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise OSError("timm has no pretrained weights for it")
    if cfg.hf_hub_id:
        from huggingface_hub import hf_hub_download

        endpoint = _endpoint()
        _probe(endpoint)
        repo = cfg.hf_hub_id.split("@")[0]
        last: Exception | None = None
        for filename in ([cfg.hf_hub_filename] if cfg.hf_hub_filename else _HF_FILES):
            try:
                return Path(hf_hub_download(repo, filename, cache_dir=_hf_cache(), endpoint=endpoint,
                                            etag_timeout=HUB_TIMEOUT))
            except Exception as e:  # this file name is not in the repo: try the next one
                last = e
        raise OSError(f"{repo} on {endpoint}: {type(last).__name__}: {str(last).splitlines()[0][:150]}")
    _probe(cfg.url)
    dst = _torch_hub_file(cfg.url)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(dst.suffix + ".part")
    with urllib.request.urlopen(cfg.url, timeout=HUB_TIMEOUT * 6) as r, open(tmp, "wb") as f:
        while chunk := r.read(1 << 20):
            f.write(chunk)
    tmp.replace(dst)
    return dst


def _probe(url: str) -> None:
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=HUB_TIMEOUT).close()
    except urllib.error.HTTPError:
        return  # it answered
    except Exception as e:
        reason = getattr(e, "reason", e)
        raise OSError(f"{url} unreachable ({reason})") from None


def resolve_weights(backbones, weights_dir: str | Path | None = None) -> dict[str, Path]:
    """The weights file of every backbone (`local_weights`, else one download attempt into the
    cache; none in offline mode, ``HF_HUB_OFFLINE=1``).

    Returns:
        ``{backbone: path of its weights file}``.
    Raises:
        PretrainedUnavailable: one line naming every backbone without weights, why, and the ways
            to provide them.
    """
    if weights_dir and not Path(weights_dir).is_dir():
        raise PretrainedUnavailable(f"model.weights_dir {weights_dir}: no such folder")
    found, missing = {}, {}
    for name in dict.fromkeys(backbones):
        path = local_weights(name, weights_dir)
        if path is None and not _offline():
            try:
                path = _download(name)
            except Exception as e:
                missing[name] = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        elif path is None:
            missing[name] = "not cached, and HF_HUB_OFFLINE is set"
        if path is not None:
            found[name] = path
    if missing:
        where = f"the weights folder {weights_dir}, " if weights_dir else ""
        raise PretrainedUnavailable(
            f"pretrained weights for backbone(s) {', '.join(missing)} cannot be had ({'; '.join(f'{k}: {v}' for k, v in missing.items())}; "
            f"looked in {where}the Hugging Face cache {_hf_cache()}). Provide them: a folder of files named "
            f"<backbone>.safetensors (or .pth) given as model.weights_dir, or a filled Hugging Face cache "
            f"(HF_HOME; HF_HUB_OFFLINE=1 to use it offline), or train from scratch with model.pretrained=false (a study: --set model.pretrained=false; model.pretrained=auto falls back to it)")
    return found


def check_loadable(found: dict[str, Path]) -> None:
    """Build each backbone once with its weights file (`resolve_weights`' result), as a trial
    would (timm adapts the head and the input channels), so a file that is there but does not fit
    (another architecture's weights, a truncated or foreign file) is refused before the first
    trial, not by every trial that samples it.

    Raises:
        PretrainedUnavailable: one line naming each backbone, its file and why it does not load.
    """
    import timm

    bad = {}
    for name, path in found.items():
        try:
            timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), num_classes=0)
        except Exception as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            bad[name] = f"{path}: {type(e).__name__}: {' '.join(lines[:3])[:300]}"
    if bad:
        raise PretrainedUnavailable(
            f"pretrained weights found but not loadable for backbone(s) {', '.join(bad)} ({'; '.join(bad.values())}). "
            f"Replace the file with that backbone's own weights, or train from scratch with model.pretrained=false (a study: "
            f"--set model.pretrained=false)")


def check_pretrained(backbones, pretrained, weights_dir: str | Path | None = None, warn=None) -> None:
    """Before any training: the weights of every backbone in `backbones` found and loadable when
    any value `model.pretrained` may take (`pretrained`: True, False, "auto") is True. With "auto"
    (and no True) a backbone without weights is only a warning (`warn(line)`): those runs start
    from random init.

    Raises:
        PretrainedUnavailable: pretrained weights are required and a backbone has none, or its file
            does not load (one line naming them and the ways to provide them).
    """
    if True in pretrained:
        check_loadable(resolve_weights(backbones, weights_dir or None))
    elif "auto" in pretrained:
        try:
            check_loadable(resolve_weights(backbones, weights_dir or None))
        except PretrainedUnavailable as e:
            if warn is not None:
                warn(f"warning: {e} (model.pretrained=auto: those runs start from random init)")
