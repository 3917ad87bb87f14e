"""Student and teacher files across the layouts FD users meet; import the submodules directly.

* :mod:`.reading` — the one load policy for every file fdfast reads (weights-only, an explicit allow-list of
  data-only classes, opt-in ``trust_pickle`` from the command line only; TorchScript archives read without
  ``torch.jit.load``).
* :mod:`.loading` — student weights from fdfast, official FD, EsViT-style and timm files, loaded strictly with
  a report.
* :mod:`.conversion` — official <-> timm keys, relative position bias un-sharing and (cubic) resizing.
* :mod:`.export` — timm weights with a self-describing ``config.json``, and the official FD layout.

The package itself imports nothing, so ``fdfast.checkpoint`` can use :mod:`.reading` without a cycle.
"""
