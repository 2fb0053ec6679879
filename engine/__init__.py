"""SLIDE engine: LSH-sampled sparse training and sub-linear inference for extreme classification.

Public API (numpy + numba only; knows nothing of HTTP):

    from engine import SlideConfig, ModelConfig, SamplingConfig, OptimizerConfig, ScheduleConfig, PredictConfig
    from engine import Dataset, read_xmc, write_xmc, XMCStreamParser, XMCParseError
    from engine import save_dataset, load_dataset, Trainer, SlideModel, SnapshotStore, load_model
    from engine import precision_at_k, ndcg_at_k, psp_at_k, evaluate
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "SlideConfig": "engine.config",
    "ModelConfig": "engine.config",
    "SamplingConfig": "engine.config",
    "OptimizerConfig": "engine.config",
    "ScheduleConfig": "engine.config",
    "PredictConfig": "engine.config",
    "ConfigError": "engine.config",
    "Dataset": "engine.sparse",
    "save_dataset": "engine.sparse",
    "load_dataset": "engine.sparse",
    "read_xmc": "engine.data",
    "write_xmc": "engine.data",
    "parse_xmc_bytes": "engine.data",
    "XMCStreamParser": "engine.data",
    "XMCParseError": "engine.data",
    "XMCTooLargeError": "engine.data",
    "generate_to_files": "engine.synth",
    "SnapshotError": "engine.snapshot",
    "generate": "engine.synth",
    "PRESETS": "engine.synth",
    "precision_at_k": "engine.metrics",
    "ndcg_at_k": "engine.metrics",
    "psp_at_k": "engine.metrics",
    "propensity_scores": "engine.metrics",
    "evaluate": "engine.metrics",
    "SlideModel": "engine.network",
    "Trainer": "engine.trainer",
    "TrainingMetrics": "engine.progress",
    "SnapshotStore": "engine.snapshot",
    "load_model": "engine.snapshot",
    "owned_bytes": "engine.snapshot",
    "read_manifest": "engine.snapshot",
    "manifest_resolved": "engine.snapshot",
    "resolve": "engine.resolve",
    "Resolved": "engine.resolve",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
