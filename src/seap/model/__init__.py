"""Models: architecture adapters, finding, opening and loading models, safetensors checkpoints, the
meta-device skeleton, fingerprints, weight summaries, pruned Hugging Face folders and their remote
code, the tokenizer and the runtime (device, dtype, memory). Nothing here imports seap.pruning.prune.
"""
