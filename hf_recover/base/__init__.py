"""The base every part stands on: the logit losses (pure torch), recovery data, `PrunedConfig`, loading, model
anatomy, evaluation, reporting, the `evaluate` metrics and the embedded defaults. It imports nothing of hf_recover
above it."""
