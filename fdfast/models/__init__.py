"""Students (``student.py``: timm Beit / SwinV2 with FD's init); teachers (``teachers.py`` builds one from its
family, ``families.py``, and its files: FD's release files, ``teacher_files.py``, or timm / OpenCLIP folders,
hub caches and single files, ``teacher_layouts.py``); the token rules of a target (``token_rules.py``), the
teacher target (``target.py``) and its PHI-S whitening (``phi_s.py``), the heads of a student of several teachers
(``heads.py``) and the attention kernels (``attention.py``). Import from the modules themselves."""
