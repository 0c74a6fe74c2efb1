"""The TOML job file: its schema (``schema.py``) and how a file becomes a ``JobFile``
(``load.py``): typed, validated before any work, every problem reported at once."""

from vlmtune.config.load import dump_toml, load_job, parse_override
from vlmtune.config.schema import (
    AlgorithmConfig,
    ComputeConfig,
    ConfigError,
    DPOConfig,
    HyperparametersConfig,
    JobConfig,
    JobFile,
    LoggingConfig,
    LoraConfig,
    ModelConfig,
    RLConfig,
    TrainingConfig,
)

__all__ = [
    "AlgorithmConfig",
    "ComputeConfig",
    "ConfigError",
    "DPOConfig",
    "HyperparametersConfig",
    "JobConfig",
    "JobFile",
    "LoggingConfig",
    "LoraConfig",
    "ModelConfig",
    "RLConfig",
    "TrainingConfig",
    "dump_toml",
    "load_job",
    "parse_override",
]
