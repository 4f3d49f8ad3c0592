"""Dataset loader of the local lm-eval task `hf_recover_facts` (see hf_recover_facts.yaml).

lm-eval imports this module from the YAML's folder (`custom_dataset: !function hf_recover_facts.load_dataset`), so
the JSONL is found next to this file whatever the current working directory is.
"""

from pathlib import Path

DATA_FILE = Path(__file__).with_name("hf_recover_facts.jsonl")


def load_dataset(**kwargs):
    """The task's `DatasetDict` with one `test` split; lm-eval passes the task `metadata` as keyword arguments."""
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(DATA_FILE)})
