"""Models: encoders (``encoders``) of the supported families (``families``: BERT/MiniLM, RoBERTa, ELECTRA,
DistilBERT, DeBERTa-v2) and the task models built on them (``heads``).

Typical use::

    teacher_encoder, tokenizer = load_encoder("default")          # offline all-MiniLM-L6-v2
    student_encoder = build_student(cfg.model, teacher_encoder, tokenizer)   # e.g. teacher layers [2, 4, 6]
    teacher = MetaTeacher(teacher_encoder, num_labels=2, num_domains=4)
    student = Student(student_encoder, num_labels=2, teacher_hidden_size=384,
                      teacher_domain_hidden_size=teacher.domain_hidden_size, num_domains=4)
    g = student_layer_map(cfg.model, teacher_layers=6)              # (0, 2, 4, 6)
"""

from metakd_ray.models.encoders import (
    PAPER_SHAPES,
    EncoderOutput,
    ModelLoadError,
    build_student,
    check_attention_compatible,
    check_max_length,
    compression_ratio,
    default_teacher_path,
    describe_models,
    encode,
    evenly_spaced_layers,
    kept_teacher_layers,
    layer_map,
    load_encoder,
    param_count,
    random_encoder,
    resolve_model,
    student_from_teacher,
    student_layer_map,
)
from metakd_ray.models.families import FAMILIES, UnsupportedFamily, family_of
from metakd_ray.models.heads import (
    TASK_MODELS,
    ClassifierTeacher,
    DomainHead,
    MetaTeacher,
    MTLTeacher,
    Student,
    StudentOutput,
    TeacherOutput,
    load_task_model,
    save_task_model,
)

__all__ = [
    "PAPER_SHAPES", "EncoderOutput", "ModelLoadError", "build_student", "check_attention_compatible",
    "check_max_length", "compression_ratio", "default_teacher_path", "describe_models", "encode",
    "evenly_spaced_layers", "kept_teacher_layers", "layer_map", "load_encoder", "param_count", "random_encoder",
    "resolve_model", "student_from_teacher", "student_layer_map", "FAMILIES", "UnsupportedFamily", "family_of",
    "TASK_MODELS", "ClassifierTeacher", "DomainHead", "MetaTeacher", "MTLTeacher", "Student", "StudentOutput",
    "TeacherOutput", "load_task_model", "save_task_model",
]
