"""MAIS model core: SAM-Med3D (medim) + memory bank + memory attention. Imports torch, numpy, medim only.

`lib.model.config` (the network's configuration, no torch), `lib.model.builder` (build_mais), `lib.model.weights`
(MAIS weights files), `lib.model.import_sam_med3d` (official SAM-Med3D checkpoints) and `lib.model.mais` (the
model). This file imports nothing, so that `import lib.model.config` stays free of torch.
"""
