"""The embedding wing: files -> pixels -> vectors, and the cache they land in.

images.py      opening a file as RGB pixels (the decoder guards, EXIF orientation), its SHA-256
embedders.py   loading a vision model (MODEL_KINDS) and taking its embedding (FEATURE_RULES)
adapted.py     the adapted model kind: a folder `hm finetune` wrote, loaded as a registered model
builtin.py     the built-in EfficientNet-Lite0 backbone, prepared offline from its PyPI package
backends.py    PyTorch or ONNX Runtime for a model on this machine (`--backend`)
onnx/          the backbone exported once to ONNX and run on the CPU with ONNX Runtime
pipeline.py    hash, decode and embed many files in batches; the vectors cached in headmaster.db
ray_engine.py  the same on a Ray cluster (Ray Data: decode tasks, embedding actors), hm embed --engine ray
vector_files.py  cached vectors as Parquet files (hm vectors export/import, hm embed --engine ray --out)
cores.py       how many threads decode and how many the model gets; heap.py, freed memory given back
registry.py    the registered models (hm model-add, model-list, ...); context.py, what every command needs

It never decides anything about an image: no heads, no buckets, no file moves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from headmaster import lazy_exports

# name -> the module of this wing that defines it; imported on first use, so importing the wing costs nothing
_EXPORTS = {
    "DECODER_VERSION": "images",
    "INPUT_NAME": "onnx.runtime",
    "BackboneVectors": "onnx.graph",
    "Context": "context",
    "Embedder": "embedders",
    "EmbedOptions": "context",
    "EmbedResult": "pipeline",
    "ExportReport": "vector_files",
    "ImageError": "images",
    "ImportReport": "vector_files",
    "PreprocessSpec": "onnx.preprocess",
    "RayOptions": "ray_engine",
    "RayPlan": "ray_engine",
    "RayResult": "ray_engine",
    "Skipped": "pipeline",
    "VectorWriter": "vector_files",
    "activate_model": "registry",
    "add_adapters": "adapted",
    "add_model": "registry",
    "check_readable_on_workers": "ray_engine",
    "cpu_session": "onnx.runtime",
    "default_workers": "pipeline",
    "describe_import": "vector_files",
    "embed_for": "pipeline",
    "embed_for_ray": "ray_engine",
    "embed_paths": "pipeline",
    "embed_paths_ray": "ray_engine",
    "export_module": "onnx.graph",
    "export_vectors": "vector_files",
    "file_sha256": "images",
    "get_embedder": "embedders",
    "hash_paths": "pipeline",
    "import_vectors": "vector_files",
    "load_embedder": "embedders",
    "load_image": "images",
    "ordered_map": "pipeline",
    "plan_ray": "ray_engine",
    "prepare_image": "pipeline",
    "probe_pixels": "onnx.backbone",
    "probe_size": "embedders",
    "progress_enabled": "pipeline",
    "release_freed_memory": "heap",
    "require_ray": "ray_engine",
    "scan_paths": "pipeline",
    "spec_from_processor": "onnx.preprocess",
    "vectors_for": "pipeline",
    "warm_embedder": "pipeline",
    "worker_setup": "pipeline",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from headmaster.embedding.adapted import add_adapters
    from headmaster.embedding.context import Context, EmbedOptions
    from headmaster.embedding.embedders import Embedder, get_embedder, load_embedder, probe_size
    from headmaster.embedding.heap import release_freed_memory
    from headmaster.embedding.images import DECODER_VERSION, ImageError, file_sha256, load_image
    from headmaster.embedding.onnx.backbone import probe_pixels
    from headmaster.embedding.onnx.graph import BackboneVectors, export_module
    from headmaster.embedding.onnx.preprocess import PreprocessSpec, spec_from_processor
    from headmaster.embedding.onnx.runtime import INPUT_NAME, cpu_session
    from headmaster.embedding.pipeline import (EmbedResult, Skipped, default_workers, embed_for, embed_paths,
                                               hash_paths, ordered_map, prepare_image, progress_enabled, scan_paths,
                                               vectors_for, warm_embedder, worker_setup)
    from headmaster.embedding.ray_engine import (RayOptions, RayPlan, RayResult, check_readable_on_workers,
                                                 embed_for_ray, embed_paths_ray, plan_ray, require_ray)
    from headmaster.embedding.registry import activate_model, add_model
    from headmaster.embedding.vector_files import (ExportReport, ImportReport, VectorWriter, describe_import,
                                                   export_vectors, import_vectors)

__getattr__ = lazy_exports(__name__, _EXPORTS)
