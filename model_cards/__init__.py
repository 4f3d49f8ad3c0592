"""Model card templates shipped with hf_recover (the top-level `model_cards/` folder)."""
