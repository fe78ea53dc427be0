"""The served names of one process: builds the backbones and engines from the config, and answers which scorer a
request's `model` means (its name or an alias; none: the first model). See service/models.py for the kinds."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

from rewardmodel.modeling import ModelSource, resolve_model
from rewardmodel.normalization import load_stats, stats_block
from service.config import ServeConfig
from service.engine import RewardEngine, model_aliases, source_paths
from service.errors import invalid
from service.models import Ensemble, Gate, LengthFit, Rule, ServedModel, check_groups, group_advantages, not_found

log = logging.getLogger("rewardserve.house")


class ModelHouse:
    def __init__(self, config: ServeConfig, engines: list[RewardEngine], scorers: dict[str, Any], default: str):
        self.config = config
        self.engines = engines
        self.scorers = scorers
        self.default = default
        self._by_alias: dict[str, str] = {}
        for name, scorer in scorers.items():
            for alias in getattr(scorer, "aliases", ()):
                self._by_alias.setdefault(alias, name)

    # ---- building -------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, config: ServeConfig) -> "ModelHouse":
        """Resolve every model, load each backbone once (score-head overlays of one base share it), and make the
        scorers; the first model is the default. Blocking (loads weights)."""
        from service.backends.registry import create_backend

        entries = config.model_entries()
        sources = [resolve_model(e.path) for e in entries]
        groups: dict[tuple, list[int]] = {}
        for i, source in enumerate(sources):
            key = source.backbone_key() if config.backend == "hf" else ("own", i)
            groups.setdefault(key, []).append(i)
        engines, columns = [], {}
        for members in groups.values():
            first = entries[members[0]]
            backend = create_backend(config, sources=[sources[i] for i in members], name=first.name or None)
            engine = RewardEngine(config, backend)
            engines.append(engine)
            offset = 0
            for i in members:
                columns[i] = (engine, offset)
                offset += sources[i].head_count
        scorers: dict[str, Any] = {}
        folders: set[str] = set()
        for i, (entry, source) in enumerate(zip(entries, sources)):
            engine, offset = columns[i]
            name = entry.name or engine.name
            aliases = set(entry.aliases) | ({entry.path} if entry.path != name else set())
            if i == 0 and not config.models:  # `--model X` alone: every name the one model answers to
                aliases |= model_aliases(config, name, source) - {name}
            else:  # one of several: its own folder too (verl and vLLM clients send a model's path), if no
                aliases |= source_paths(source) - {name} - folders  # earlier entry of the same folder has it
            folders |= source_paths(source)
            scorers.update(_models_of(name, aliases, entry, source, engine, offset))
        for spec in config.ensembles:
            def served(member: str, role: str = "a member") -> ServedModel:
                scorer = scorers.get(member)
                if not isinstance(scorer, ServedModel):
                    raise ValueError(f"ensemble {spec.name!r} names {role} that is not a served model: {member!r} "
                                     f"(models: {sorted(n for n, s in scorers.items() if isinstance(s, ServedModel))})")
                return scorer

            gate = None
            if spec.gate is not None:
                gate = Gate(served(spec.gate.model, "a gate"), spec.gate.threshold,
                            [served(m, "a gate member") for m in spec.gate.members], list(spec.gate.members.values()),
                            spec.gate.reads)
            scorers[spec.name] = Ensemble(
                spec.name, [served(m) for m in spec.members], list(spec.members.values()), spec.combine, spec.penalty,
                spec.normalize, [Rule(r.kind, r.weight, r.target, r.pattern) for r in spec.rules], gate=gate)
        default = (entries[0].name or engines[0].name) if entries else next(iter(scorers))
        return cls(config, engines, scorers, default)

    # ---- lookup ---------------------------------------------------------------------------------------------
    def resolve(self, name: str | None) -> Any:
        if not name:
            return self.scorers[self.default]
        scorer = self.scorers.get(name) or self.scorers.get(self._by_alias.get(name, ""))
        if scorer is None and len(name) > 1 and name.endswith("/"):  # a folder's path as `ls` or a shell writes it
            scorer = self.scorers.get(self._by_alias.get(name.rstrip("/"), ""))
        if scorer is None:
            raise not_found(name, list(self.scorers))
        return scorer

    async def score(self, inputs: Any, *, model: str | None = None, deadline: float | None = None,
                    normalize: bool = False, groups: Any = None, field: str = "inputs") -> Any:
        """Score with the named scorer; with `groups` (GRPO: lists of input indices sharing a prompt), each
        grouped score also gets its group-relative advantages, from the scorer's final reward."""
        scorer = self.resolve(model)
        if groups is not None:
            check_groups(groups, len(inputs))  # refused before any work
        outcome = await scorer.score(inputs, deadline=deadline, normalize=normalize, field=field)
        if groups is not None:
            normalized, centered = group_advantages([r.reward for r in outcome.results], groups, len(inputs))
            for result, a, c in zip(outcome.results, normalized, centered):
                result.advantage, result.advantage_centered = a, c
        return outcome

    def describe(self) -> list[dict[str, Any]]:
        return [scorer.describe() for scorer in self.scorers.values()]

    @property
    def engine(self) -> RewardEngine:
        """The default model's engine."""
        scorer = self.resolve(None)
        return scorer.engines()[0]

    def deadline_from_timeout(self, timeout_s: float | None) -> float | None:
        """An absolute (monotonic) deadline from a relative timeout; the configured default applies."""
        if timeout_s is None or timeout_s == 0:
            timeout_s = self.config.default_timeout_s or None
        if timeout_s is None:
            return None
        if not math.isfinite(timeout_s) or timeout_s < 0:
            raise invalid(f"timeout must be a positive number of seconds, got {timeout_s}")
        return time.monotonic() + timeout_s

    # ---- lifecycle ------------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return all(e.ready for e in self.engines)

    @property
    def accepting(self) -> bool:
        return all(e.accepting for e in self.engines)

    @property
    def depth(self) -> int:
        return sum(e.batcher.depth for e in self.engines)

    async def start(self) -> None:
        for engine in self.engines:
            await engine.start()
        log.info("serving %s (default %s)", sorted(self.scorers), self.default)

    def mark_draining(self) -> None:
        for engine in self.engines:
            engine.mark_draining()

    async def stop(self) -> None:
        await asyncio.gather(*(e.stop() for e in self.engines))


def _models_of(name: str, aliases: set[str], entry: Any, source: ModelSource, engine: RewardEngine,
               offset: int) -> dict[str, Any]:
    """The scorers of one model entry: one head; or a multi-head overlay's heads `name/<head>` and `name` as the
    mean of them."""
    home = source.home
    debias = entry.debias == "length"
    if not source.heads:
        block = stats_block(home)
        length = LengthFit.from_stats(block)
        if debias and length is None:
            raise ValueError(f"model {name!r}: debias: length needs a `length` fit in {home}/reward_stats.json")
        return {name: ServedModel(name, engine, offset, load_stats(home), length, debias, source.prm, aliases)}
    heads = []
    for j, head in enumerate(source.heads):
        length = LengthFit.from_stats(stats_block(home, head))
        if debias and length is None:
            raise ValueError(f"model {name!r}: head {head!r} has no `length` fit to debias with")
        heads.append(ServedModel(f"{name}/{head}", engine, offset + j, load_stats(home, head), length, debias))
    out: dict[str, Any] = {m.name: m for m in heads}
    out[name] = overlay_ensemble(name, heads, source.ensemble, aliases)
    return out


def overlay_ensemble(name: str, heads: list[ServedModel], block: dict[str, Any] | None,
                     aliases: set[str]) -> Ensemble:
    """What a multi-head overlay serves under its own name: the mean of its heads, or what its `ensemble` block
    (rewardserve_overlay.json, written by `train rm --gate`) declares: `{combine, normalize, members: [head...],
    gate: {head, threshold, members: [head...], reads: prompt | input}}`, checked as a config file's ensemble is."""
    if not block:
        return Ensemble(name, heads, [1.0] * len(heads), "mean", aliases=aliases)
    from pydantic import ValidationError

    from service.config import EnsembleEntry

    by_head = {m.name.split("/", 1)[1]: m for m in heads}
    gate = block.get("gate")
    try:
        spec = EnsembleEntry(
            name=name, combine=block.get("combine", "mean"), penalty=block.get("penalty", 0.5),
            normalize=block.get("normalize", False), members=dict.fromkeys(block.get("members") or by_head, 1.0),
            gate=None if not gate else {"model": gate.get("head"), "threshold": gate.get("threshold", 0.0),
                                        "members": dict.fromkeys(gate.get("members") or [], 1.0),
                                        "reads": gate.get("reads", "input")})
    except ValidationError as exc:
        e = exc.errors()[0]
        raise ValueError(f"model {name!r}: its overlay's ensemble block: {'.'.join(map(str, e['loc']))}: "
                         f"{e['msg']}") from None

    def head(h: str) -> ServedModel:
        if h not in by_head:
            raise ValueError(f"model {name!r}: its overlay's ensemble names head {h!r}; the heads are {sorted(by_head)}")
        return by_head[h]

    members = [head(h) for h in spec.members]
    routed = None
    if spec.gate is not None:
        g = spec.gate
        routed = Gate(head(g.model), g.threshold, [head(h) for h in g.members], list(g.members.values()), g.reads)
    return Ensemble(name, members, list(spec.members.values()), spec.combine, spec.penalty, spec.normalize,
                    aliases=aliases, gate=routed)
