"""Typed, frozen configuration for every stage of metakd_ray.

A config is a tree of frozen dataclasses (``Config`` at the root, sections in ``schema.py``). Every section checks
itself when constructed: ``DistillConfig(temperature=-1.0)`` or ``dataclasses.replace(cfg.sweep, methods=(...))``
with a bad value raises :class:`ConfigError`. A config is loaded from YAML with ``yaml.safe_load`` and
``key=value`` overrides (``distill.gamma2=0.2``), checked against the field types and ranges (``fields.py``).
Every problem is reported at once, one line each, naming the dotted path, the bad value, what is allowed and, for
a typo, the nearest valid key; constructing a section directly gives the same line for the same value::

    python -m metakd_ray.config validate sweeps/smoke.yaml distill.gamma2=0.2

prints the resolved config as YAML (exit 0) or every error (exit 2).

Option names follow ../shared/docs/metakd-method.md; each field's comment says what the paper does and
what the reference code does where they differ. Defaults are the paper's.
"""

from metakd_ray.config.cli import main
from metakd_ray.config.fields import ConfigError
from metakd_ray.config.load import from_dict, load, parse_override, to_dict, to_yaml, with_overrides, write_resolved
from metakd_ray.config.schema import (
    AMAZON_DOMAINS,
    DEFAULT_TEACHER,
    MNLI_GENRES,
    STUDENT_METHODS,
    TEACHER_KINDS,
    TUNABLE,
    TUNABLE_NAMES,
    VALID_METHODS,
    ComputeConfig,
    Config,
    DataConfig,
    Dataset,
    DistillConfig,
    ModelConfig,
    RayConfig,
    StorageConfig,
    StudentConfig,
    StudentMethod,
    SweepConfig,
    TableConfig,
    TeacherConfig,
    TeacherKind,
)

__all__ = [
    "ConfigError", "Config", "DataConfig", "TableConfig", "ModelConfig", "StudentConfig", "TeacherConfig",
    "DistillConfig", "ComputeConfig", "SweepConfig", "RayConfig", "StorageConfig", "AMAZON_DOMAINS", "MNLI_GENRES",
    "DEFAULT_TEACHER", "TEACHER_KINDS", "STUDENT_METHODS", "VALID_METHODS", "TUNABLE", "TUNABLE_NAMES", "Dataset",
    "TeacherKind", "StudentMethod", "parse_override", "from_dict", "load", "to_dict", "to_yaml", "with_overrides",
    "write_resolved", "main",
]
