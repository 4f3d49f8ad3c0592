"""What a `DistillationTrainer` save writes, and where a push sends it: the student's weights and tokenizer (Trainer's
own save), `pruned_config.json`, the projectors (in checkpoints, and in the export with `save_projectors`), and a
model card with hf_recover's sections and everything `Trainer.create_model_card` writes (`hf_recover.publish`); a
push sends the saved folder in one commit with `hf_recover.push_recovered`."""

from __future__ import annotations

import os
from pathlib import Path

PROJECTORS_NAME = "projectors.safetensors"
"""Where the learnable projectors are written: every checkpoint, and the exported model with `save_projectors`."""


class SavesRecoveredModels:
    """The save, model-card and push methods of `DistillationTrainer` (a mixin before `transformers.Trainer`)."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.pruned_config is not None:
            self.pruned_config.save_pretrained(output_dir)
        if self.projectors is not None and (self._saving_checkpoint or self.args.save_projectors):
            from safetensors.torch import save_file

            state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.projectors.state_dict().items()}
            save_file(state, os.path.join(output_dir, PROJECTORS_NAME), metadata={"format": "pt"})
        self._write_model_card(output_dir)

    def _write_model_card(self, output_dir: str, **card_args) -> None:
        from ..publish.trainer_card import save_trainer_model_card  # hf_recover's sections and Trainer's

        save_trainer_model_card(self, output_dir, **card_args)

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """Write the model card (`README.md`) into `args.output_dir`, merged into an existing one.

        The card has everything `Trainer.create_model_card` writes for the same run (its metadata with every
        argument here, the hyperparameters, the training-results table, the evaluation results, the framework
        versions) and hf_recover's sections (what was pruned, how it was recovered, before/after perplexity).
        `finetuned_from` (the card's `base_model`) and `license` default to the teacher's for a pruned student.
        """
        card_args = {name: value for name, value in locals().items() if name != "self"}  # Trainer's names, as given
        if self.is_world_process_zero():
            self._write_model_card(self.args.output_dir, **card_args)

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs,
    ):
        """Save the student (weights, tokenizer, `pruned_config.json`, model card) into `args.output_dir` and push
        that folder to `args.hub_model_id` in one commit with `hf_recover.push_recovered`.

        The push is always blocking. `kwargs` are `create_model_card`'s arguments (`model_name`, `finetuned_from`,
        `language`, `license`, `tags`, `tasks`, `dataset`, ...), as for `Trainer.push_to_hub`; the model's own
        `model_tags` join `tags`.
        """
        from ..publish.hub import push_recovered

        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        self.save_model(self.args.output_dir, _internal_call=True)
        if not self.is_world_process_zero():
            return None
        model_tags = getattr(self.model, "model_tags", None)
        if model_tags:  # as Trainer.push_to_hub: the model's own tags join the card's
            tags = kwargs.get("tags")
            tags = [tags] if isinstance(tags, str) else list(tags or [])
            kwargs["tags"] = list(dict.fromkeys([*tags, *model_tags]))
        self.create_model_card(**kwargs)
        repo_id = self.hub_model_id or self.args.hub_model_id or Path(self.args.output_dir).absolute().name
        return push_recovered(
            self.args.output_dir,
            repo_id,
            private=private if private is not None else self.args.hub_private_repo,
            token=token if token is not None else self.args.hub_token,
            commit_message=commit_message,
            revision=revision if revision is not None else self.args.hub_revision,
        )
