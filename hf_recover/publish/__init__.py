"""Publishing a recovered model: its model card (rendered from `model_cards/`, merged into an existing README) and
the push to the Hugging Face Hub. Imports only `hf_recover.base`."""
