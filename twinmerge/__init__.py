"""Twin-Merging core library: pure torch / transformers / safetensors (no Prefect, no DVC).

Modules: `io` (checkpoints, safetensors, atomic writes), `merge` (shared-expert merge methods),
`exclusive` (exclusive knowledge as SVD factors), `router` (features + MLP router), `routed` (batched
per-sample merged model), `metrics` (task metrics and normalised score).
"""
__version__ = "0.1.0"
