"""Teacher stage: what a teacher is (``artefact``: identity, storage layout, loading), how it learns (``model``:
prototype scores, teacher kinds, their losses and the loop), and the Ray Train job that makes one (``job``: import
it only to train; it imports ``ray.train``). CLI: ``python -m metakd_ray.teacher``."""

from metakd_ray.teacher.artefact import (
    MANIFEST,
    PROTOTYPE_FILE,
    TEACHER_FORMAT,
    TeacherArtefact,
    TeacherLocation,
    TeacherNotFound,
    TeacherSpec,
    check_worker_split,
    finished_teacher,
    load_teacher,
    model_location,
    prototype_parts,
    read_prototype_scores,
    resolve_teacher,
    teacher_fingerprint,
    teacher_identity,
    teacher_spec,
    teacher_specs_for,
    write_prototype_scores,
)
from metakd_ray.teacher.model import (
    build_teacher,
    compute_prototype_scores,
    pool_prototype_scores,
    pooled_features,
    teacher_forward,
    teacher_logits,
    teacher_loss,
    train_teacher,
)

__all__ = [
    "MANIFEST", "PROTOTYPE_FILE", "TEACHER_FORMAT", "TeacherArtefact", "TeacherLocation", "TeacherNotFound",
    "TeacherSpec", "check_worker_split", "finished_teacher", "load_teacher", "model_location", "prototype_parts",
    "read_prototype_scores", "resolve_teacher", "teacher_fingerprint", "teacher_identity", "teacher_spec",
    "teacher_specs_for", "write_prototype_scores",
    "build_teacher", "compute_prototype_scores", "pool_prototype_scores", "pooled_features", "teacher_forward",
    "teacher_logits", "teacher_loss", "train_teacher",
]
