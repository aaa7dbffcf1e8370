"""Everything that touches an ``nn.Module``: unit groups and physical removal
(:mod:`~mipp.surgery.structure`, via Torch-Pruning), forward hooks
(:mod:`~mipp.surgery.capture`, the only place that installs them), parameter / MAC
predictions (:mod:`~mipp.surgery.costs`), the shared calibration set
(:mod:`~mipp.surgery.calibration`), one-shot repairs (:mod:`~mipp.surgery.repair`) and
replaying a prune report onto a fresh model (:mod:`~mipp.surgery.replay`).
"""
