"""Students (``student.py``: timm Beit / SwinV2 with FD's init), teachers (``teachers.py``: timm models
from the original release files), the teacher target (``target.py``) and the attention kernels
(``attention.py``). Import from the modules themselves."""
