"""What to prune, as one typed object: `PruneSpec`, parsed once from every form a user writes it in.

A spec has a depth part (blocks to remove, and how to heal the cuts) and/or a width part (MLP neurons, attention
heads, the hidden size); depth is applied first. It is written as

- a shorthand, parts chained with `+`: `importance:6`, `angular:6:heal=lstsq`, `remove:3,12+width:maw:0.2`,
  `width:activation:0.25+heads:0.67+hidden:540` (`PRUNE_SPEC_GRAMMAR` lists every form);
- a JSON object or a dict of `prune_depth` / `prune_width` arguments: `{"depth": {"method": "importance", "n": 6,
  "heal": "lstsq"}, "width": {"pruning_ratio": 0.2}}`;
- a `PruneSpec` built in Python: `PruneSpec(depth=DepthSpec(method="angular", n=6, heal=HealSpec("lstsq")))`.

`PruneSpec.parse` turns any of them into the same frozen object, which checks its own values when it is made,
checks itself against a model before any work (`check`), says whether it reads calibration data
(`needs_calibration`), prunes (`build`), names itself (`str(spec)`, the canonical shorthand) and turns back into
the dict form (`to_dict`). `select_candidate`, `prune`, `recover`, the demo and the strategy lab all take it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from torch import nn

from ..base.anatomy import attention_heads, decoder_layers, mlp_sizes
from .depth import DEPTH_METHODS, SCORE_FOR_METHOD, plan_removal, prune_depth
from .healing import HealSpec, check_heal
from .importance import check_layer_indices
from .width import (
    HIDDEN_METHODS,
    WIDTH_METHODS,
    check_mlp_target,
    check_width_options,
    plan_heads_and_hidden,
    prune_width,
    target_sizes,
)
from .width_healing import WIDTH_HEAL_METHODS

PRUNE_SPEC_GRAMMAR = """\
Prune specs. Depth (remove N blocks, chosen by a method, or the blocks listed):
  importance:N            the N blocks of lowest block influence (ShortGPT), scored on calibration data
  angular:N               the N contiguous blocks of smallest angular distance (Gromov et al.)
  greedy:N                one block at a time by KL to the unpruned model, re-scored after each removal
  last:N                  the last N blocks (the naive baseline)
  remove:I,J,...          exactly these blocks
  ...:heal=lstsq          heal each cut without training: a least-squares map folded into the block before it
  ...:heal=cosine         the same map, fitted to the cosine distance
  ...:heal=local          the least-squares map, then the block before each cut trained alone against the teacher's
                          hidden state after the cut (block-local distillation; options as JSON: {"method": "local",
                          "steps": 200, "learning_rate": 3e-4})
Width (the parts of one width step, combined):
  width:METHOD:RATIO      remove the fraction RATIO of every block's MLP neurons, ranked by METHOD
                          (maw, vow, pon, or activation: weights times calibration activations)
  heads:N or heads:R      keep N query heads per block (a multiple of the KV heads), or the fraction R
  hidden:S or hidden:R    keep a hidden size of S channels, or the fraction R
  hidden:S:rotate         the same size, by rotating the residual stream into its principal axes first (SliceGPT)
  ...:heal=lstsq          after a width part: refit the remaining down_proj / o_proj columns by least squares
Chain parts with '+', depth first (importance:4+width:maw:0.1), or give a JSON object of prune_depth /
prune_width arguments: {"depth": {"method": "angular", "n": 6, "heal": "lstsq"}, "width": {"heads": 6}}."""
"""The one description of the grammar: every `--help` and the documentation take it from here."""


@dataclass(frozen=True)
class DepthSpec:
    """Which blocks to remove: `n` of them chosen by `method`, or exactly `remove`; and how to heal the cuts."""

    method: str = "importance"
    """One of `DEPTH_METHODS` (`"manual"` when `remove` lists the blocks)."""
    n: int | None = None
    remove: tuple[int, ...] | None = None
    heal: HealSpec | None = None

    def __post_init__(self):
        if self.remove is not None:
            if not isinstance(self.remove, list | tuple) or not self.remove:
                raise ValueError(f"depth remove must be a non-empty list of block indices, got {self.remove!r}.")
            object.__setattr__(self, "remove", tuple(self.remove))
            if self.n is not None:
                raise ValueError(
                    "Give either depth remove= (the blocks to drop) or n= (how many to choose), not both."
                )
            object.__setattr__(self, "method", "manual")
        else:
            if self.method not in DEPTH_METHODS:
                raise ValueError(f"depth method must be one of {list(DEPTH_METHODS)}, got {self.method!r}.")
            if self.n is None:
                raise ValueError("Say which blocks to remove: remove=[indices] or n=<how many> with a method.")
            if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
                raise ValueError(f"depth n must be a number of blocks >= 1, got {self.n!r}.")
        object.__setattr__(self, "heal", HealSpec.parse(self.heal))

    @property
    def scored(self) -> bool:
        """Whether the blocks are scored on calibration data (block influence, angular distance, greedy KL)."""
        return self.remove is None and self.method != "last"

    @property
    def needs_calibration(self) -> bool:
        """Whether this depth pruning reads calibration data: to score the blocks, or to heal the cuts."""
        return self.scored or self.heal is not None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"remove": list(self.remove)} if self.remove is not None else {}
        if self.remove is None:
            out.update(method=self.method, n=self.n)
        if self.heal is not None:
            out["heal"] = self.heal.to_dict()
        return out

    @property
    def has_shorthand(self) -> bool:
        return self.heal is None or self.heal.has_shorthand

    def __str__(self) -> str:
        text = f"remove:{','.join(map(str, self.remove))}" if self.remove is not None else f"{self.method}:{self.n}"
        return text + (f":heal={self.heal}" if self.heal is not None else "")


@dataclass(frozen=True)
class WidthSpec:
    """What width pruning removes: MLP neurons (one of `pruning_ratio`, `expansion_rate`), query heads (`heads`), the
    hidden size (`hidden_size`), in the blocks `layers` (every block by default). See `prune_width`."""

    method: str = "maw"
    pruning_ratio: float | None = None
    expansion_rate: float | None = None
    divisor: int = 1
    layers: tuple[int, ...] | None = None
    heads: int | float | None = None
    hidden_size: int | float | None = None
    hidden_method: str = "slice"
    """`"slice"` (channels ranked by activations) or `"rotate"` (principal axes; `hf_recover.prune.rotation`)."""
    heal: HealSpec | None = None
    """`"lstsq"` (or `HealSpec("lstsq")`, the heal type depth parts take): refit the remaining `down_proj` / `o_proj`
    columns (`hf_recover.prune.width_healing`)."""

    def __post_init__(self):
        if self.method not in WIDTH_METHODS:
            raise ValueError(f"width method must be one of {list(WIDTH_METHODS)}, got {self.method!r}.")
        if self.hidden_method not in HIDDEN_METHODS:
            raise ValueError(f"width hidden_method must be one of {list(HIDDEN_METHODS)}, got {self.hidden_method!r}.")
        if self.heal is not None:
            method = self.heal.get("method") if isinstance(self.heal, Mapping) else getattr(self.heal, "method", None)
            if (self.heal if isinstance(self.heal, str) else method) not in WIDTH_HEAL_METHODS:
                raise ValueError(f"width heal takes one of {list(WIDTH_HEAL_METHODS)}, got {self.heal!r}.")
            heal = HealSpec.parse(self.heal)
            if not heal.has_shorthand:
                raise ValueError(
                    "width heal refits columns on the unpruned model's inputs and takes no setting but its method, "
                    f"got {heal.to_dict()!r}."
                )
            object.__setattr__(self, "heal", heal)
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
        check_width_options(
            prune_mlp=self.prunes_mlp, heads=self.heads, hidden_size=self.hidden_size,
            hidden_method=self.hidden_method, heal=self.heal.method if self.heal is not None else None,
        )  # fmt: skip
        if self.prunes_mlp:  # model-free range checks; sizes are checked against a model in `PruneSpec.check`
            check_mlp_target(self.pruning_ratio, self.expansion_rate, self.divisor)

    @property
    def prunes_mlp(self) -> bool:
        """Whether MLP neurons are removed: a ratio or rate is given, or nothing else is."""
        return (
            self.pruning_ratio is not None
            or self.expansion_rate is not None
            or (self.heads is None and self.hidden_size is None)
        )

    @property
    def needs_calibration(self) -> bool:
        """Whether `prune_width` reads calibration activations: to rank neurons (`activation`), heads or hidden
        channels, or to refit the remaining columns (`heal`)."""
        scored = (self.prunes_mlp and self.method == "activation") or self.heads is not None
        return scored or self.hidden_size is not None or self.heal is not None

    def prune_width_kwargs(self) -> dict[str, Any]:
        """The `prune_width` keyword arguments this spec stands for."""
        return {
            f.name: list(value) if isinstance(value, tuple) else value
            for f in fields(self)
            if (value := getattr(self, f.name)) is not None
        }

    def to_dict(self) -> dict[str, Any]:
        out = self.prune_width_kwargs()
        if self.heal is not None:
            out["heal"] = self.heal.to_dict()
        if not self.prunes_mlp:
            out.pop("method")
        for name, default in (("divisor", 1), ("hidden_method", "slice")):
            if out.get(name) == default:
                out.pop(name)
        return out

    @property
    def has_shorthand(self) -> bool:
        mlp_shorthand = self.pruning_ratio is not None and self.divisor == 1
        return self.layers is None and (mlp_shorthand or not self.prunes_mlp)

    def __str__(self) -> str:
        parts = [f"width:{self.method}:{self.pruning_ratio:g}"] if self.prunes_mlp else []
        parts += [f"heads:{self.heads}"] if self.heads is not None else []
        rotate = ":rotate" if self.hidden_method == "rotate" else ""
        parts += [f"hidden:{self.hidden_size}{rotate}"] if self.hidden_size is not None else []
        return "+".join(parts) + (f":heal={self.heal}" if self.heal is not None else "")


SPEC_PARTS = {"depth": DepthSpec, "width": WidthSpec}


@dataclass(frozen=True)
class PruneSpec:
    """A depth part and/or a width part (depth is applied first). Build one with `PruneSpec.parse`."""

    depth: DepthSpec | None = None
    width: WidthSpec | None = None

    def __post_init__(self):
        if self.depth is None and self.width is None:
            raise ValueError('A prune spec needs a "depth" and/or a "width" part.\n\n' + PRUNE_SPEC_GRAMMAR)

    @classmethod
    def parse(cls, value: str | Mapping[str, Any] | PruneSpec) -> PruneSpec:
        """The spec written as a shorthand, a JSON object, a dict of arguments, or a `PruneSpec` (returned as is)."""
        if isinstance(value, PruneSpec):
            return value
        if isinstance(value, Mapping):
            return cls._from_mapping(value)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(
                f"A prune spec is a string, a dict or a PruneSpec, got {value!r}.\n\n{PRUNE_SPEC_GRAMMAR}"
            )
        text = value.strip()
        if text.startswith("{"):
            try:
                loaded = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"Prune spec {value!r} is not valid JSON: {err}.") from err
            return cls._from_mapping(loaded)
        return cls._from_mapping(_parse_shorthand(text))

    @classmethod
    def _from_mapping(cls, value: Any) -> PruneSpec:
        if not isinstance(value, Mapping) or not value or set(value) - set(SPEC_PARTS):
            raise ValueError(f"A prune spec is a dict with keys 'depth' and/or 'width'; got {value!r}.")
        parts = {}
        for kind, options in value.items():
            part = SPEC_PARTS[kind]
            if not isinstance(options, Mapping):
                raise ValueError(f"Prune spec {kind!r} takes a dict of arguments; got {options!r}.")
            parts[kind] = part(**_known_keys(options, [f.name for f in fields(part)], kind))
        return cls(**parts)

    @property
    def heals(self) -> bool:
        """Whether the spec heals its cuts (depth or width) before any training."""
        return (self.depth is not None and self.depth.heal is not None) or (
            self.width is not None and self.width.heal is not None
        )

    def without_healing(self) -> PruneSpec:
        """The same cut, left as it is made: what healing is measured against."""
        return PruneSpec(
            depth=replace(self.depth, heal=None) if self.depth is not None else None,
            width=replace(self.width, heal=None) if self.width is not None else None,
        )

    @property
    def needs_calibration(self) -> bool:
        """Whether pruning by this spec reads calibration data (to score blocks, neurons, heads or channels, or to
        heal the cuts): pass `data=` to `build`."""
        return any(part.needs_calibration for part in (self.depth, self.width) if part is not None)

    def to_dict(self) -> dict[str, Any]:
        """The dict form: `{"depth": {...prune_depth arguments}, "width": {...prune_width arguments}}`."""
        return {kind: part.to_dict() for kind, part in (("depth", self.depth), ("width", self.width)) if part}

    def __str__(self) -> str:
        """The shorthand (`angular:6:heal=lstsq+heads:6`), or the JSON form where a setting has no shorthand."""
        parts = [part for part in (self.depth, self.width) if part is not None]
        if all(part.has_shorthand for part in parts):
            return "+".join(str(part) for part in parts)
        return json.dumps(self.to_dict(), sort_keys=True)

    # -- against a model ---------------------------------------------------------------------------------------

    def check(self, model: nn.Module, data: Any = None) -> None:
        """Check the spec against `model` (block counts, sizes, head grouping) and calibration `data` before any
        work; raises `ValueError` saying what is wrong."""
        n_layers, sizes, heads = len(decoder_layers(model)), mlp_sizes(model), attention_heads(model)
        if self.depth is not None:
            depth = self.depth
            check_heal(model, depth.heal, data)
            removed, _, _ = plan_removal(
                model, n_layers, list(depth.remove) if depth.remove else None, depth.n,
                "importance" if depth.remove else depth.method, None, data,
            )  # fmt: skip
            n_layers -= len(removed) if removed is not None else depth.n
            # Which blocks a scored method removes is not known yet; their sizes only matter where they differ.
            kept = [i for i in range(len(sizes)) if removed is None or i not in set(removed)][:n_layers]
            sizes, heads = [sizes[i] for i in kept], [heads[i] for i in kept]
        if self.width is not None:
            width = self.width
            layers = check_layer_indices(list(width.layers) if width.layers else None, n_layers, "layers")
            if width.prunes_mlp:
                target_sizes(
                    [sizes[i] for i in layers], model.config.hidden_size, pruning_ratio=width.pruning_ratio,
                    expansion_rate=width.expansion_rate, divisor=width.divisor,
                )  # fmt: skip
            plan_heads_and_hidden(model, width.heads, width.hidden_size, layers, data, head_counts=heads)
            if width.prunes_mlp and width.method == "activation" and data is None:
                raise ValueError("method='activation' scores neurons on calibration data: pass data=.")

    def build(
        self,
        model: nn.Module,
        data: Any = None,
        *,
        inplace: bool = False,
        block_scores: dict[tuple[str, int], Any] | None = None,
        batch_size: int = 8,
        max_batches: int | None = None,
    ) -> tuple[nn.Module, Any]:
        """Prune `model` as the spec says; return `(student, PrunedConfig)`. `model` is untouched unless `inplace`.

        `data` is the calibration data (see `needs_calibration`). `block_scores` is a cache of block scores keyed by
        `(score, n_blocks)` that candidates pruned from the same teacher share: scores found there are reused, and
        those computed here are added.
        """
        from .importance import _block_scores

        student, pruned_config = model, None
        if self.depth is not None:
            depth = self.depth
            kwargs: dict[str, Any] = {"inplace": inplace, "batch_size": batch_size, "max_batches": max_batches}
            if depth.remove is not None:
                kwargs["remove"] = list(depth.remove)
            else:
                kwargs.update(method=depth.method, n=depth.n)
            if depth.heal is not None:
                kwargs["heal"] = depth.heal
            if depth.needs_calibration:
                kwargs["data"] = data
            if block_scores is not None and depth.method in SCORE_FOR_METHOD:
                key = (SCORE_FOR_METHOD[depth.method], depth.n if depth.method == "angular" else 1)
                if key not in block_scores:
                    block_scores[key], _, _ = _block_scores(
                        model, data, method=key[0], n_blocks=key[1], batch_size=batch_size, max_batches=max_batches
                    )
                kwargs["scores"] = block_scores[key]
            student, pruned_config = prune_depth(student, **kwargs)
        if self.width is not None:
            data_for_width = data if self.width.needs_calibration else None
            student, pruned_config = prune_width(
                student, inplace=inplace or student is not model, data=data_for_width, batch_size=batch_size,
                max_batches=max_batches, **self.width.prune_width_kwargs(),
            )  # fmt: skip
        # The copy inherits the teacher's flags, and a teacher that trained a student before is frozen.
        if student is not model:
            student.requires_grad_(True)
        return student, pruned_config


def _known_keys(options: Mapping[str, Any], known, what: str) -> dict[str, Any]:
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"Prune spec {what!r} has unknown key(s) {unknown}; its keys are {sorted(known)}.")
    return dict(options)


def _parse_shorthand(text: str) -> dict[str, Any]:
    """`importance:6:heal=lstsq+width:maw:0.2` -> the dict form (checked by the dataclasses afterwards)."""
    result: dict[str, Any] = {}
    seen: dict[str, str] = {}  # each kind of part once: a second one would silently replace the first
    for part in text.split("+"):
        part, _, heal = part.partition(":heal=")
        kind, _, rest = part.partition(":")
        what = "depth" if kind in (*DEPTH_METHODS, "remove") else kind
        if what in seen:
            raise ValueError(
                f"Prune spec {text!r} has two {what} parts, {seen[what]!r} and {part!r}: give one (depth parts "
                "remove blocks once; chain a depth part with width parts, as in importance:4+width:maw:0.1)."
            )
        seen[what] = part
        if kind in DEPTH_METHODS and rest.isdigit():
            result["depth"] = {"method": kind, "n": int(rest)}
        elif kind == "remove" and rest:
            try:
                result["depth"] = {"remove": [int(i) for i in rest.split(",")]}
            except ValueError:
                raise ValueError(f"Prune spec {part!r}: 'remove:' takes comma-separated block indices.") from None
        elif kind == "width" and rest.count(":") == 1:
            method, ratio = rest.split(":")
            try:
                result.setdefault("width", {}).update(method=method, pruning_ratio=float(ratio))
            except ValueError:
                raise ValueError(f"Prune spec {part!r}: the width ratio must be a number.") from None
        elif kind in ("heads", "hidden") and rest:
            if kind == "hidden" and rest.endswith(":rotate"):
                rest = rest.removesuffix(":rotate")
                result.setdefault("width", {})["hidden_method"] = "rotate"
            try:  # digits: a count or size; anything else: the fraction kept
                value = int(rest) if rest.isdigit() else float(rest)
            except ValueError:
                raise ValueError(f"Prune spec {part!r}: give a count or a fraction after '{kind}:'.") from None
            result.setdefault("width", {})["heads" if kind == "heads" else "hidden_size"] = value
        else:
            raise ValueError(f"Unknown prune spec part {part!r}.\n\n{PRUNE_SPEC_GRAMMAR}")
        if heal:
            result["depth" if kind in (*DEPTH_METHODS, "remove") else "width"]["heal"] = heal
    return result
