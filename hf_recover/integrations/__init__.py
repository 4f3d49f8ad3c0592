"""Distillation inside other libraries' trainers. Each integration is its own module, imported only when used
(`from hf_recover.integrations.trl import DistillationSFTTrainer`), so `import hf_recover` never imports them."""
