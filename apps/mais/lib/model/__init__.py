"""MAIS model core: SAM-Med3D (medim) + memory bank + memory attention. Imports torch, numpy, medim only.

Entry points live in `lib.model.build` (configs, builders, weights files) and `lib.model.mais` (the model).
"""
