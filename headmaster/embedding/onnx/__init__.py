"""The ONNX Runtime backend: a model's backbone exported once to ONNX and run on the CPU.

backbone.py    the export (cached per model fingerprint) and the ORT embedder hm embed/classify use
graph.py       the torch module that becomes the graph: pixels -> the vector the head reads
preprocess.py  the Hugging Face processor's arithmetic repeated in numpy, exactly
runtime.py     the ONNX Runtime session on this machine's cores

Used through embedding/backends.py (`--backend onnxruntime`, or `auto` on a CPU).
"""
