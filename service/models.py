"""What a server serves, by name: models (a head of a backbone), process reward models, ensembles with rules.

- A **backbone** is one loaded network with its engine (batcher + worker). Models that are score-head overlays of
  the same base weights share one backbone: one forward pass reads every head (rewardmodel/modeling.py
  `backbone_key`), so another head costs a column of the head GEMM, not another pass.
- A **ServedModel** is one head of a backbone under a name (a multi-head overlay `N` serves each head as `N/<head>`
  and `N` itself as the mean of its heads), optionally length-debiased; a process reward model reads a score at
  every step end.
- An **Ensemble** combines member models (weighted mean | min | mean − λ·std, optionally of normalized rewards)
  plus rule terms; members that share a backbone are computed in the same pass, and a member's reward inside the
  ensemble is bit-identical to the member scored alone (the invariant forward).

Every scorer answers `admit` (queue room, before any work) and `score` (-> ScoreOutcome) the same way, so the
transports never care which kind they talk to.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from rewardmodel.inputs import PromptResponseInput, StepsInput, response_text
from rewardmodel.normalization import RewardStats
from rewardmodel.rendering import RenderError, token_ids
from rewardmodel.rules import answer_match, compile_pattern, format_match
from rewardmodel.steps import encode_steps, split_steps, step_scores
from service import metrics
from service.batcher import Reservation
from service.engine import Evaluated, RewardEngine, ScoreOutcome
from service.errors import ErrorKind, RewardServeError, invalid
from service.schemas import ScoreResult


@dataclass
class LengthFit:
    """reward − slope × (response tokens − mean_tokens): a head's linear dependence on length, removed."""

    slope: float
    mean_tokens: float

    @classmethod
    def from_stats(cls, stats: dict[str, Any] | None) -> "LengthFit | None":
        block = (stats or {}).get("length")
        if not block:
            return None
        return cls(float(block["slope"]), float(block["mean_tokens"]))


def response_tokens(tokenizer: Any, inp: Any, field: str) -> int:
    text = response_text(inp)
    if text is None:
        raise invalid(f"{field}: this model reads the response's length, which a raw or pre-rendered text does not "
                      "tell apart from its prompt (the vLLM-compatible routes send text rendered as vLLM does): "
                      "send prompt/response, messages or steps to /v1/score or gRPC Score")
    return len(token_ids(tokenizer, text, add_special_tokens=False))


# ---- one head of a backbone -------------------------------------------------------------------------------
@dataclass
class ServedModel:
    name: str
    engine: RewardEngine
    column: int
    """The first output column of this model's head in its backbone's head GEMM."""
    stats: RewardStats | None = None
    length: LengthFit | None = None
    debias: bool = False
    prm: Any = None  # rewardmodel.steps.PRMSpec
    aliases: set[str] = field(default_factory=set)
    kind = "model"

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_length(self) -> int:
        return self.engine.max_length

    def engines(self) -> list[RewardEngine]:
        return [self.engine]

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.name, "object": "model", "owned_by": "rewardserve",
            "kind": "prm" if self.prm is not None else "model", "max_model_len": self.max_length,
            "normalization": self.stats.to_json() if self.stats else None, "aliases": sorted(self.aliases),
            "length_debiased": self.debias, "backbone": self.engine.name, **self.engine.describe(),
        }

    def admit(self, count: int, *, normalize: bool = False, field: str = "inputs") -> Reservation:
        self.check_normalize(normalize)
        return self.engine.admit(count, field=field)

    def check_normalize(self, normalize: bool) -> None:
        if normalize and self.stats is None:
            raise invalid(f"model {self.name!r} has no reward statistics (reward_stats.json): cannot normalize")

    def encoder(self, field: str) -> Any:
        """How this model turns an input into token ids (a PRM: with its step ends)."""
        if self.prm is None:
            def encode(inp: Any) -> Any:
                if isinstance(inp, StepsInput) or getattr(inp, "step_separator", None):
                    raise RenderError(f"model {self.name!r} has no step head: send `response` (no steps)")
                return self.engine.default_encoder(inp)

            return encode
        spec = self.prm

        def encode_prm(inp: Any) -> Any:
            if isinstance(inp, StepsInput):
                steps = inp.steps
            elif isinstance(inp, PromptResponseInput):
                steps = split_steps(inp.response, inp.step_separator or spec.step_separator)
            else:
                raise RenderError(f"model {self.name!r} is a process reward model: send `prompt` with `steps`, or "
                                  f"`prompt` and `response` (cut at its step separator {spec.step_separator!r})")
            return encode_steps(self.tokenizer, inp.prompt, steps, self.max_length, spec.step_separator)

        return encode_prm

    def results(self, inputs: Sequence[Any], evaluated: Evaluated, normalize: bool, field: str) -> list[ScoreResult]:
        """This model's scores from a backbone evaluation (shared with other heads of the same pass)."""
        out = []
        for i, (inp, enc, values) in enumerate(zip(inputs, evaluated.encoded, evaluated.values)):
            steps = None
            if self.prm is not None:
                cols = values[:, self.column:self.column + self.prm.num_labels]
                steps = [float(x) for x in step_scores(cols, self.prm)]
                reward = steps[-1]
            else:
                reward = float(values[-1, self.column])
            if self.debias and self.length is not None:
                tokens = response_tokens(self.tokenizer, inp, f"{field}.{i}")
                reward = float(np.float32(reward - self.length.slope * (tokens - self.length.mean_tokens)))
            out.append(ScoreResult(
                reward=reward, truncated=enc.truncated, tokens=enc.tokens, step_rewards=steps,
                normalized=self.stats.normalize(reward) if normalize and self.stats else None,
            ))
        metrics.observe_results(self.name, [r.reward for r in out], sum(r.truncated for r in out))
        return out

    async def score(self, inputs: Sequence[Any], *, deadline: float | None = None, normalize: bool = False,
                    encoder: Any = None, reservation: Reservation | None = None,
                    field: str = "inputs") -> ScoreOutcome:
        if reservation is None:
            reservation = self.admit(len(inputs), normalize=normalize, field=field)
        else:
            self.check_normalize(normalize)
        if self.debias:  # refuse what cannot be debiased before spending the forward pass on it
            for i, inp in enumerate(inputs):
                if response_text(inp) is None:
                    reservation.release()
                    response_tokens(self.tokenizer, inp, f"{field}.{i}")
        evaluated = await self.engine.evaluate(inputs, deadline=deadline, encoder=encoder or self.encoder(field),
                                               reservation=reservation, field=field)
        return ScoreOutcome(self.name, self.results(inputs, evaluated, normalize, field), evaluated.queue_s,
                            evaluated.compute_s)


# ---- ensembles ----------------------------------------------------------------------------------------------
COMBINES = ("mean", "weighted", "min", "mean_minus_std")
PROMPT_SUFFIX = "@prompt"  # a prompt-reading gate's reward, in an ensemble's `members`


def combine_values(values: list[float], rule: str, weights: Sequence[float],
                   penalty: float = 0.0) -> tuple[float, float]:
    """(combined value, population std) of one input's member values under a combine rule (COMBINES)."""
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std()) if len(arr) > 1 else 0.0
    if rule == "min":
        return float(arr.min()), std
    if rule == "weighted":
        w = np.asarray(weights, dtype=np.float64)
        return float((w * arr).sum() / w.sum()), std
    mean = float(arr.mean())
    if rule == "mean_minus_std":
        return mean - penalty * std, std
    return mean, std


@dataclass
class Rule:
    kind: str
    weight: float
    target: int = 0
    pattern: str | None = None

    @property
    def label(self) -> str:
        return self.kind if self.kind != "regex" else f"regex:{self.pattern}"

    def value(self, inp: Any, tokenizer: Any, field: str) -> float:
        text = response_text(inp)
        if text is None:  # raw input: the whole text is the response as far as rules can tell
            text = inp.raw if hasattr(inp, "raw") else inp.get("raw", "")
        if self.kind == "length":
            return float(max(0, len(token_ids(tokenizer, text, add_special_tokens=False)) - self.target))
        if self.kind == "regex":
            return format_match(text, self.pattern or "", full=False)
        reference = getattr(inp, "reference", None) if not isinstance(inp, dict) else inp.get("reference")
        if reference is None:
            raise invalid(f"{field}.reference: the answer rule needs the reference answer; send `reference`")
        return answer_match(text, reference)


@dataclass
class Ensemble:
    name: str
    members: list[ServedModel]
    weights: list[float]
    combine: str = "mean"
    penalty: float = 0.5
    normalize_members: bool = False
    rules: list[Rule] = field(default_factory=list)
    aliases: set[str] = field(default_factory=set)
    gate: "Gate | None" = None
    kind = "ensemble"

    def __post_init__(self) -> None:
        for rule in self.rules:
            if rule.pattern is not None:
                compile_pattern(rule.pattern)  # unsafe patterns are refused when the server starts
        if self.normalize_members:
            missing = [m.name for m in self.members if m.stats is None]
            if missing:
                raise ValueError(f"ensemble {self.name!r} normalizes its members, but {missing[0]!r} has no "
                                 "reward_stats.json")
        if any(m.prm is not None for m in self.read):
            raise ValueError(f"ensemble {self.name!r}: process reward models cannot be ensemble members")
        if self.gate is not None and self.normalize_members:
            missing = [m.name for m in self.gate.members if m.stats is None]
            if missing:
                raise ValueError(f"ensemble {self.name!r} normalizes its members, but gate member {missing[0]!r} has "
                                 "no reward_stats.json")

    @property
    def read(self) -> list[ServedModel]:
        """Every model whose reward this ensemble reads on the inputs, each once: members, the gate's members, and
        the gate where it reads the whole input."""
        out: dict[str, ServedModel] = {m.name: m for m in self.members}
        if self.gate is not None:
            for m in [*([self.gate.model] if self.gate.reads == "input" else []), *self.gate.members]:
                out.setdefault(m.name, m)
        return list(out.values())

    @property
    def tokenizer(self) -> Any:
        return self.members[0].tokenizer

    @property
    def max_length(self) -> int:
        return min(m.max_length for m in self.read)

    def engines(self) -> list[RewardEngine]:
        seen: dict[int, RewardEngine] = {}
        for m in self.read:
            seen.setdefault(id(m.engine), m.engine)
        return list(seen.values())

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.name, "object": "model", "owned_by": "rewardserve", "kind": "ensemble",
            "max_model_len": self.max_length, "combine": self.combine, "penalty": self.penalty,
            "normalize": self.normalize_members, "members": dict(zip([m.name for m in self.members], self.weights)),
            "rules": [{"kind": r.kind, "weight": r.weight, **({"pattern": r.pattern} if r.pattern else {}),
                       **({"target": r.target} if r.kind == "length" else {})} for r in self.rules],
            "aliases": sorted(self.aliases), "normalization": None, **self._computes(),
            **({"gate": {"model": self.gate.model.name, "threshold": self.gate.threshold, "reads": self.gate.reads,
                         "members": dict(zip([m.name for m in self.gate.members], self.gate.weights))}}
               if self.gate is not None else {}),
        }

    def _computes(self) -> dict[str, Any]:
        """How its members' backbones compute, as one model's entry says it: a value they share, else the list of
        their values; `batch_invariant` true only when every one of them is (None if any cannot tell)."""
        described = [e.describe() for e in self.engines()]
        out: dict[str, Any] = {}
        for key in ("dtype", "forward", "compiled"):
            values = [d[key] for d in described if key in d]
            if values:
                distinct = sorted({str(v) for v in values})
                out[key] = values[0] if len(distinct) == 1 else distinct
        flags = [d.get("batch_invariant") for d in described]
        out["batch_invariant"] = None if any(f is None for f in flags) else all(flags)
        return out

    def admit(self, count: int, *, normalize: bool = False, field: str = "inputs") -> "MultiReservation":
        if normalize:
            raise invalid(f"ensemble {self.name!r} has no reward statistics of its own: send normalize=false (set "
                          "`normalize: true` in its config to combine the members' normalized rewards)")
        taken = []
        try:
            for engine in self.engines():
                taken.append(engine.admit(count, field=field))
        except BaseException:
            for r in taken:
                r.release()
            raise
        return MultiReservation(taken)

    def combined(self, values: list[float]) -> tuple[float, float]:
        """(combined reward, std) of the members' values."""
        return combine_values(values, self.combine, self.weights, self.penalty)

    async def score(self, inputs: Sequence[Any], *, deadline: float | None = None, normalize: bool = False,
                    encoder: Any = None, reservation: "MultiReservation | None" = None,
                    field: str = "inputs") -> ScoreOutcome:
        unfit = self.unfit_for_token_routes() if encoder is not None else None
        if unfit:
            raise invalid(f"{self.name!r} is an ensemble that {unfit}: the vLLM-compatible routes score a single "
                          "model or an ensemble of heads of one backbone without rules or a prompt-reading gate; use "
                          "/v1/score")
        if reservation is None:
            reservation = self.admit(len(inputs), normalize=normalize, field=field)
        engines = self.engines()
        try:
            rules = [[rule.value(inp, self.tokenizer, f"{field}.{i}") for rule in self.rules]
                     for i, inp in enumerate(inputs)]  # refused before the forward passes if a reference is missing
            prompts, prompt_of, gate_reservation = self._gate_prompts(inputs, field)
        except BaseException:
            reservation.release()
            raise
        # A gate over the members' backbone reads its prompts in the same submission as the inputs: queued
        # together, each prompt is computed as the prefix its answers share (service/grouping.py), nearly free.
        along = prompts and any(e is self.gate.model.engine for e in engines)
        jobs = []
        for e, r in zip(engines, reservation.parts):
            batch = inputs
            if along and e is self.gate.model.engine:
                r.absorb(gate_reservation)
                batch = [*inputs, *prompts]
            jobs.append(e.evaluate(batch, deadline=deadline, encoder=encoder or self._member(e).encoder(field),
                                   reservation=r, field=field))
        if prompts and not along:
            gate = self.gate.model
            jobs.append(gate.engine.evaluate(prompts, deadline=deadline, encoder=gate.encoder(field),
                                             reservation=gate_reservation, field=field))
        evaluated = await gather_releasing(jobs, reservation, gate_reservation)
        gate_evaluated = evaluated[-1] if prompts and not along else None
        if along:
            n = len(inputs)
            k = next(j for j, e in enumerate(engines) if e is self.gate.model.engine)
            both = evaluated[k]
            evaluated[k] = Evaluated(both.encoded[:n], both.values[:n], both.queue_s, both.compute_s)
            gate_evaluated = Evaluated(both.encoded[n:], both.values[n:], both.queue_s, both.compute_s)
        by_engine = dict(zip(map(id, engines), evaluated))
        read = self.read
        by_name = {m.name: m.results(inputs, by_engine[id(m.engine)], self.normalize_members, field) for m in read}
        gate_key = None
        if prompts:
            on_prompts = self.gate.model.results(prompts, gate_evaluated, False, field)
            gate_key = self.gate.model.name + PROMPT_SUFFIX  # never a member's key: a gate may route to itself
            by_name[gate_key] = [on_prompts[k] for k in prompt_of]

        def used(m: ServedModel, i: int) -> float:
            r = by_name[m.name][i]
            return r.normalized if self.normalize_members else r.reward

        results = []
        for i in range(len(inputs)):
            raw = {name: by_name[name][i].reward for name in by_name}  # members, gate members, then the gate
            if self.gate is not None and raw[gate_key or self.gate.model.name] > self.gate.threshold:
                reward, std = self.gate.combined([used(m, i) for m in self.gate.members])
            else:
                reward, std = self.combined([used(m, i) for m in self.members])
            terms = {rule.label: value for rule, value in zip(self.rules, rules[i])}
            reward += sum(rule.weight * value for rule, value in zip(self.rules, rules[i]))
            first = by_name[read[0].name][i]
            results.append(ScoreResult(reward=reward, truncated=any(by_name[m.name][i].truncated for m in read),
                                       tokens=first.tokens, members=raw, std=std, rules=terms or None))
        metrics.observe_results(self.name, [r.reward for r in results], sum(r.truncated for r in results))
        return ScoreOutcome(self.name, results, max(e.queue_s for e in evaluated), max(e.compute_s for e in evaluated))

    def unfit_for_token_routes(self) -> str | None:
        """Why vLLM's routes (their own token encoding, one model's tokenizer) cannot score this ensemble, or None:
        they can where every model it reads is a head of one backbone and nothing reads the response apart (rules,
        a prompt-reading gate), as a multi-head overlay served under its name (e.g. `helpful`)."""
        if len(self.engines()) > 1:
            return "reads several backbones"
        if self.rules:
            return "has rules"
        if self.gate is not None and self.gate.reads == "prompt":
            return "routes by the prompt"
        return None

    @property
    def engine(self) -> RewardEngine:
        """The one backbone of an ensemble fit for the token routes (unfit_for_token_routes() is None)."""
        unfit = self.unfit_for_token_routes()
        if unfit:
            raise AttributeError(f"ensemble {self.name!r} {unfit}: it has no single engine")
        return self.engines()[0]

    def _gate_prompts(self, inputs: Sequence[Any], field: str) -> tuple[list[dict], list[int], Any]:
        """A gate that reads the prompt: the distinct prompts of the inputs (the response emptied), which one each
        input has, and queue room for them on the gate's engine. Nothing for other ensembles."""
        if self.gate is None or self.gate.reads != "prompt":
            return [], [], None
        import json

        from rewardmodel.rendering import prompt_only

        prompts: list[dict] = []
        index: dict[str, int] = {}
        prompt_of = []
        for i, inp in enumerate(inputs):
            prompt = prompt_only(inp)
            if prompt is None:
                raise invalid(f"{field}.{i}: ensemble {self.name!r} routes by the prompt, and a raw input's prompt "
                              "cannot be told apart from its response: send prompt/response or messages (OpenRLHF: "
                              "clients/openrlhf_reward.py with REWARDSERVE_INPUT=pair; verl: the prompt in "
                              "extra_info), score its members by name, or declare a gate with reads: input")
            key = json.dumps(prompt, sort_keys=True, ensure_ascii=False)
            prompt_of.append(index.setdefault(key, len(prompts)))
            if prompt_of[-1] == len(prompts):
                prompts.append(prompt)
        return prompts, prompt_of, self.gate.model.engine.admit(len(prompts), field=field)

    def _member(self, engine: RewardEngine) -> ServedModel:
        return next(m for m in self.read if m.engine is engine)


@dataclass
class Gate:
    """An ensemble's routing: where `model`'s raw reward is above `threshold`, the weighted mean of `members`
    answers instead of the ensemble's own combine (Llama 2's safety/helpfulness switch, with a learned gate). Reading
    the prompt, every response to one prompt takes the same side (pairs and GRPO groups compare on one scale)."""

    model: ServedModel
    threshold: float
    members: list[ServedModel]
    weights: list[float]
    reads: str = "prompt"  # "prompt": the gate reads each input's prompt (its response emptied); "input": all of it

    def combined(self, values: list[float]) -> tuple[float, float]:
        return combine_values(values, "weighted", self.weights)


async def gather_releasing(jobs: Sequence[Any], *reservations: Any) -> list[Any]:
    """Run the engines' jobs of one request together. However it ends, the reservations are released (a job
    cancelled before it started never entered its own `with reservation`: its room stayed taken for good), and
    when one job fails or the caller goes away the others are cancelled (they held queue room for nothing)."""
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
                task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: no log line
        for r in reservations:
            if r is not None:
                r.release()


class MultiReservation:
    """Queue room on each engine an ensemble uses."""

    def __init__(self, parts: list[Reservation]):
        self.parts = parts

    def release(self) -> None:
        for part in self.parts:
            part.release()

    def __enter__(self) -> "MultiReservation":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---- GRPO groups ------------------------------------------------------------------------------------------------
GROUP_EPS = 1e-4


def check_groups(groups: Sequence[Sequence[int]], size: int, field: str = "groups") -> None:
    """Every group non-empty, every index an input's, no input in two groups."""
    seen: set[int] = set()
    for g, members in enumerate(groups):
        if not members:
            raise invalid(f"{field}.{g}: a group needs at least one input")
        for index in members:
            if not 0 <= index < size:
                raise invalid(f"{field}.{g}: input index {index} is out of range (0..{size - 1})")
            if index in seen:
                raise invalid(f"{field}.{g}: input {index} is in two groups")
            seen.add(index)


def group_advantages(rewards: Sequence[float], groups: Sequence[Sequence[int]],
                     size: int) -> tuple[list[float | None], list[float | None]]:
    """Per input, (r − mean) / (std + 1e-4) within its group (std: the sample std, as TRL's GRPO) and the mean-only
    (Dr. GRPO) r − mean; a group whose rewards are all equal gets 0; inputs in no group get None."""
    check_groups(groups, size)
    normalized: list[float | None] = [None] * size
    centered: list[float | None] = [None] * size
    for members in groups:
        r = np.asarray([rewards[i] for i in members], dtype=np.float64)
        mean = r.mean()
        std = r.std(ddof=1) if len(r) > 1 else 0.0
        equal = bool(np.all(r == r[0]))
        for i, value in zip(members, r):
            centered[i] = 0.0 if equal else float(value - mean)
            normalized[i] = 0.0 if equal else float((value - mean) / (std + GROUP_EPS))
    return normalized, centered


def finite(value: float) -> bool:
    return math.isfinite(value)


def not_found(name: str, names: Sequence[str]) -> RewardServeError:
    return RewardServeError(ErrorKind.NOT_FOUND, f"unknown model {name!r}; this server serves {sorted(names)}")
