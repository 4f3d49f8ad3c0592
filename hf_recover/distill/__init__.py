"""Distillation: `DistillationConfig` and `DistillationTrainer`, the teacher, hidden-state alignment, the fused
lm_head, and the teacher cache. Imports `hf_recover.base` and `hf_recover.publish` (the save hooks write the model
card), never `hf_recover.prune`."""
