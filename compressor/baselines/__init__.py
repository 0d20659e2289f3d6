"""Baselines: the students HomoDistil is compared with (variants.py: recipes run by the pipeline,
the untrained slice, and st_distill.py: the recipe sentence-transformers documents), trained at the
same shape and tokens, evaluated and tabled alike. They drive the pipeline, so they sit above it."""
