"""`hf-recover push`: send a recovered model folder to the Hugging Face Hub in one commit.

    hf-recover push --folder outputs/demo --repo_id you/smollm2-pruned-recovered [--private]

Sends the weights (safetensors), config, tokenizer, `pruned_config.json` and model card. Everything is
checked before anything is sent; a failed push leaves the folder untouched and can simply be retried.
The token comes from `--token`, `HF_TOKEN` or `huggingface-cli login`, and is never written anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .arguments import command_parser


@dataclass
class PushArguments:
    folder: str = field(default="outputs/demo", metadata={"help": "The recovered model folder to push."})
    repo_id: str | None = field(default=None, metadata={"help": "Hub repository, e.g. you/model-name."})
    private: bool | None = field(default=None, metadata={"help": "Create the repository as private."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: HF_TOKEN or the login)."})
    commit_message: str | None = field(default=None, metadata={"help": "Commit message."})
    revision: str | None = field(default=None, metadata={"help": "Branch to push to."})


def make_parser(subparsers=None):
    return command_parser(subparsers, "push", (PushArguments,), __doc__)


def main(args: PushArguments):
    from ..publish.hub import push_recovered

    if not args.repo_id:
        raise ValueError("--repo_id is required, e.g. --repo_id you/smollm2-pruned-recovered.")
    info = push_recovered(
        args.folder,
        args.repo_id,
        private=args.private,
        token=args.token,
        commit_message=args.commit_message,
        revision=args.revision,
    )
    print(f"Pushed {args.folder} to {args.repo_id}: {getattr(info, 'commit_url', info)}")
    return info
