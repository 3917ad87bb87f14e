"""Students (timm Beit / SwinV2 with FD's init), teachers (timm, original release files), and
checkpoint interop (official FD layout, timm export) in ``interop``."""
from .student import DistillModel, build_student, num_tokens, student_tokens
from .teachers import Teacher, TeacherLoadError, build_teacher

__all__ = ["DistillModel", "Teacher", "TeacherLoadError", "build_student", "build_teacher", "num_tokens",
           "student_tokens"]
