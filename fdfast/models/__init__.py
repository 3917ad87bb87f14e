"""Students (timm Beit / SwinV2 with FD's init), teachers (timm, original release files)."""
from .student import DistillModel, build_student, num_tokens, student_tokens

__all__ = ["DistillModel", "build_student", "num_tokens", "student_tokens"]
