"""THE configuration of a rewardserve process.

Precedence (highest first): command-line flags, `REWARDSERVE_*` environment variables, a config file
(`--config FILE`, YAML or JSON), the defaults below. Every field's docstring is its `--help` text.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ENV_PREFIX = "REWARDSERVE_"


class ModelEntry(BaseModel):
    """One served model: `{name: harmless, path: default}`."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str = Field(min_length=1, description="The name it is served under.")
    path: str = Field(min_length=1, description="default | helpful | ensemble | minilm | smollm2 | a checkpoint or "
                      "overlay folder.")
    aliases: list[str] = Field(default_factory=list, description="Other names it answers to.")
    debias: Literal["length"] | None = Field(default=None, description="`length`: serve the reward with its linear "
                                             "dependence on response length removed (fit in reward_stats.json).")


class RuleEntry(BaseModel):
    """A rule reward term of an ensemble: `{kind: length, weight: -0.001}`, `{kind: answer, weight: 1}`,
    `{kind: regex, pattern: '^Answer:', weight: 0.5}`."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["length", "answer", "regex"]
    weight: float = Field(allow_inf_nan=False)
    target: int = Field(default=0, ge=0, description="length: tokens above this are penalized (0: every token).")
    pattern: str | None = Field(default=None, description="regex: the pattern the response must match.")

    @model_validator(mode="after")
    def _pattern(self) -> "RuleEntry":
        if (self.kind == "regex") != (self.pattern is not None):
            raise ValueError("a regex rule needs `pattern`, and only a regex rule takes one")
        if self.pattern is not None:
            from rewardmodel.rules import compile_pattern

            try:
                compile_pattern(self.pattern)
            except Exception as exc:  # the safe subset only (no nested repeats, no backreferences, ...)
                raise ValueError(f"pattern {self.pattern!r}: {exc}") from None
        return self


class GateEntry(BaseModel):
    """Routing of an ensemble (Llama-2 style: the safety reward where the prompt is safety-relevant):
    `{model: ensemble/safety, threshold: 0.0, members: {ensemble/harmless: 1.0}, reads: prompt}`. Where the gate model's raw reward
    is above `threshold`, the ensemble's reward is the weighted mean of these members; elsewhere the ensemble's
    `combine` of its own members."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(min_length=1, description="The gate: a served model whose raw reward says 'route'.")
    threshold: float = Field(default=0.0, allow_inf_nan=False, description="Route where the gate's raw reward is "
                             "above this.")
    members: dict[str, float] = Field(min_length=1, description="The models (and weights) that answer where routed.")
    reads: Literal["prompt", "input"] = Field(default="prompt", description="`prompt`: the gate reads each input's "
                                              "prompt (its response emptied), so every response to one prompt takes "
                                              "the same side; raw inputs are refused. `input`: the whole input.")

    @model_validator(mode="after")
    def _weights(self) -> "GateEntry":
        import math

        bad = [name for name, w in self.members.items() if not math.isfinite(w) or w < 0]
        if bad:
            raise ValueError(f"gate member weight of {bad[0]!r} must be finite and not negative")
        if sum(self.members.values()) <= 0:
            raise ValueError("gate member weights must not all be 0")
        return self


class EnsembleEntry(BaseModel):
    """A served combination of models (and rules) under one name."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    combine: Literal["mean", "weighted", "min", "mean_minus_std"] = "mean"
    penalty: float = Field(default=0.5, ge=0, allow_inf_nan=False, description="λ of mean_minus_std.")
    members: dict[str, float] = Field(min_length=1, description="Member model names and their weights.")
    normalize: bool = Field(default=False, description="Combine the members' normalized rewards (reward_stats).")
    rules: list[RuleEntry] = Field(default_factory=list)
    gate: GateEntry | None = Field(default=None, description="Optional routing to other members where a gate model "
                                   "says so (see GateEntry).")

    @model_validator(mode="after")
    def _finite(self) -> "EnsembleEntry":
        import math

        bad = [name for name, w in self.members.items() if not math.isfinite(w)]
        if bad:
            raise ValueError(f"ensemble {self.name!r}: member weight of {bad[0]!r} is not finite")
        if self.combine == "weighted" and sum(self.members.values()) == 0:
            raise ValueError(f"ensemble {self.name!r}: weighted combine needs weights that do not sum to 0")
        return self


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, protected_namespaces=())

    model: str = "default"
    """Reward model: a Hugging Face checkpoint directory, or `default` (the shipped default RM), `helpful`,
    `ensemble`, or `minilm` / `smollm2` (bases with an untrained, random head: for speed tests, not scores).
    Repeat `--model [NAME=]SPEC` to serve several (the first is the default). On the command line it replaces a
    config file's models and the ensembles over them."""
    models: list[ModelEntry] = []
    """Several models, each `{name, path, aliases?, debias?}` (config file `models:`; the flag is a repeated
    `--model NAME=SPEC`); the first is the default. Empty: `model` alone."""
    ensembles: list[EnsembleEntry] = []
    """Served ensembles: `{name, combine: mean|weighted|min|mean_minus_std, penalty, members: {model: weight},
    normalize, rules: [{kind: length|answer|regex, weight, ...}], gate: {model, threshold, members}}` (config
    file)."""
    model_name: str | None = None
    """Name the model is served under (default: the first `served_model_name`, else the directory's name)."""
    served_model_name: list[str] = []
    """Names the model also answers to, on every route (vLLM's `--served-model-name`); the model also answers to
    the `model` spec and the path it was started with (clients such as verl send the path)."""
    backend: str = "hf"
    """Scoring backend: `hf` (transformers) or `vllm` (vLLM's pooling runner, raw logits; needs a checkpoint
    directory)."""
    device: str = "auto"
    """`auto` (cuda if available, else cpu), `cpu`, `cuda` or `cuda:N`."""
    dtype: Literal["auto", "float32", "bfloat16", "float16", "int8x3", "int8x5"] = "auto"
    """Compute dtype of the matmuls. `auto`: bfloat16 where the hardware runs it natively (CUDA; CPUs with AMX or
    AVX-512-BF16), float32 elsewhere. With the invariant forward the residual stream, norms, softmax and reward head
    stay float32 in either. `int8x5` / `int8x3` (invariant forward only): every matmul from int8 slices of its
    operands (inputs split in three or two, weights in two) with exact integer sums, all else float32; on the
    default model over 400 dev pairs rewards within 1e-3 (int8x5) or 7e-3 (int8x3) of float32, where bfloat16 is
    within 0.063 (docs/benchmarks.md); refused where the machine's int8 GEMM is not exact."""
    forward: Literal["auto", "invariant", "transformers"] = "auto"
    """`invariant`: our batch-invariant forward (an input's reward is bit-identical whatever shares its pass;
    Llama-family decoders and BERT encoders); `transformers`: the model's own forward (packed on CPU), within float
    noise of invariant; `auto`: invariant where the architecture is supported."""
    compile: Literal["auto", "on", "off"] = "auto"
    """Fuse the invariant decoder's element-wise work between matmuls (norms, rotary, SiLU, casts) with
    torch.compile (inductor; CPUs need a C++ compiler, CUDA triton), compiled at load (~20 s cold on 2 cores, a
    few seconds from inductor's disk cache); a failure stops the server. Rewards stay bit-identical in any batch;
    their last bits depend on this setting. `auto` is `off` for now: no speed-up was measured on a CPU (the
    matmuls dominate; docs/benchmarks.md) and CUDA is not measured yet."""
    threads: int = Field(0, ge=0, le=1024)
    """Intra-op threads for the model worker (0: one per available core)."""
    packing: Literal["auto", "on", "off"] = "auto"
    """Padding-free batches (sequences packed into one row, attention per sequence). The invariant forward always
    packs; `off` means padded batches through the transformers forward. For the transformers forward, `auto`: on
    for CPU with supported heads (BERT-style and decoder RMs), off on CUDA."""

    host: str = "127.0.0.1"
    """HTTP and gRPC bind address."""
    port: int = Field(8000, ge=0, le=65535)
    """HTTP port (0: pick a free port)."""
    grpc_port: int = Field(50051, ge=-1, le=65535)
    """gRPC port (0: pick a free port; -1: no gRPC server)."""

    max_batch_size: int = Field(32, ge=1, le=65536)
    """Most inputs in one forward pass."""
    max_batch_tokens: int = Field(4096, ge=1)
    """Token budget of one forward pass: padded cost (longest x inputs), or real tokens when packing."""
    max_wait_ms: float = Field(2.0, ge=0, le=60_000, allow_inf_nan=False)
    """Longest time the first queued input waits for others to join its batch (under load: an input that finds
    the worker idle for longer than this is computed at once)."""
    max_padding_ratio: float = Field(0.25, ge=0, le=1, allow_inf_nan=False)
    """A batch is cut before an input whose addition would make padding exceed this share of its tokens."""
    max_queue: int = Field(2048, ge=1)
    """Most inputs waiting or in flight; past it requests are refused at once (HTTP 429, RESOURCE_EXHAUSTED)."""
    group_min_prefix: int = Field(16, ge=0)
    """Inputs queued together that share at least this many leading tokens (a prompt's candidates, GRPO groups,
    chosen + rejected) are scored as one group, the shared prefix computed once; within a pass every shared run
    of this many tokens or more is computed once, nested (a system header, then each prompt). Decoder RMs only:
    `hf` with packing (CPU), `vllm` with prefix caching; encoder RMs are never grouped. 0: off."""

    max_tokens: int = Field(0, ge=0)
    """Longest input in tokens; longer ones are truncated from the left (0: the model's own limit)."""
    max_inputs_per_request: int = Field(1024, ge=1)
    """Most inputs in one request."""
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, le=2**31 - 1)
    """Largest HTTP request body (HTTP 413 past it) and gRPC message."""
    http_body_timeout_s: float = Field(30.0, gt=0, allow_inf_nan=False)
    """Longest an HTTP request body may take to arrive, from the first byte of the request on: a client that stalls
    mid-body is answered 408 and disconnected, and stops counting against max_http_in_flight."""
    default_timeout_s: float = Field(0.0, ge=0, allow_inf_nan=False)
    """Deadline applied to requests that bring none (0: none)."""
    warmup: bool = True
    """Run a few forward passes before reporting ready."""
    api_keys: list[str] = []
    """API keys (flag `--api-key KEY`, repeatable, as vLLM and TEI spell it; comma-separated in the env). When any
    is set, every route needs `Authorization: Bearer <key>` (gRPC: metadata `authorization`), except `open_routes`
    and gRPC health and reflection."""
    api_key_file: str | None = None
    """File with API keys, one per line (`#` comments); added to `api_keys`."""
    open_routes: list[str] = ["/health", "/ready", "/metrics"]
    """HTTP routes that need no API key."""
    tls_cert: str | None = None
    """PEM certificate (chain) for HTTPS and gRPC TLS; needs tls_key."""
    tls_key: str | None = None
    """PEM private key of tls_cert."""
    tls_client_ca: str | None = None
    """PEM CA bundle: when set, gRPC requires client certificates signed by it (mutual TLS)."""
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"
    """Log level of the rewardserve loggers (and uvicorn's; `trace` is uvicorn's most verbose)."""
    generator: str | None = None
    """Policy for Best-of-N (`POST /v1/best-of-n`, gRPC BestOfN): `vllm:PATH` (in-process vLLM), `openai:URL`
    (a remote OpenAI-compatible server, e.g. vLLM's) or `hf:PATH` (transformers generate); PATH may be
    `smollm2`. Unset: Best-of-N answers HTTP 501 / gRPC UNIMPLEMENTED (rerank works without one)."""
    max_n: int = Field(16, ge=1, le=65536)  # below generation.base.SEED_STRIDE: seeds stay apart
    """Most candidates one Best-of-N request may ask for (`n`)."""
    max_new_tokens: int = Field(512, ge=1)
    """Most new tokens per candidate a Best-of-N request may ask for (`max_tokens`)."""
    generation_timeout_s: float = Field(120.0, gt=0, allow_inf_nan=False)
    """Longest time generation may take for one Best-of-N request (504 / DEADLINE_EXCEEDED past it;
    a shorter request deadline wins)."""
    generator_max_model_len: int = Field(2048, ge=1)
    """Longest prompt + response the in-process vLLM / hf generator handles, in tokens."""
    vllm_kv_cache_gib: float = Field(1.0, gt=0, le=4096, allow_inf_nan=False)
    """GiB of KV cache an in-process vLLM (generator or backend) reserves on CPU (vLLM's VLLM_CPU_KVCACHE_SPACE;
    an exported VLLM_CPU_KVCACHE_SPACE wins). vLLM's own default is most of the machine's memory."""
    drain_timeout_s: float = Field(25.0, gt=0, le=3600, allow_inf_nan=False)
    """On SIGTERM: longest time to answer what was accepted before the servers stop (keep it under the pod's
    terminationGracePeriodSeconds minus its preStop sleep)."""
    max_http_in_flight: int = Field(1024, ge=1)
    """Most HTTP requests handled at once; past it requests are refused at once (HTTP 503, JSON body)."""
    max_stream_in_flight: int = Field(64, ge=1)
    """Most requests of one gRPC ScoreStream being scored at once; the stream reads no more until one is answered
    (backpressure through gRPC flow control)."""

    def model_entries(self) -> list[ModelEntry]:
        """The models to serve: `models`, or `model` alone under its served name (resolved by the backend)."""
        if self.models:
            return list(self.models)
        # the single model's name may still be unknown (the backend's served name): an unvalidated entry
        return [ModelEntry.model_construct(name=self.model_name or next(iter(self.served_model_name), None) or "",
                                           path=self.model, aliases=list(self.served_model_name), debias=None)]

    def served_name(self, default: str) -> str:
        """The model's name in answers: model_name, else the first served_model_name, else `default`."""
        return self.model_name or next(iter(self.served_model_name), None) or default

    @model_validator(mode="after")
    def _names(self) -> "ServeConfig":
        names = [m.name for m in self.models] + [e.name for e in self.ensembles]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"names must be unique: {dupes[0]!r} is used twice")
        models = {m.name for m in self.models}

        def unserved(names: Any) -> list[str]:  # a multi-head overlay's heads are NAME/HEAD (checked at load)
            return [m for m in names if self.models and m not in models and m.split("/", 1)[0] not in models]

        for ensemble in self.ensembles:
            missing = unserved(ensemble.members)
            if missing:
                raise ValueError(f"ensemble {ensemble.name!r} names a member that is not served: {missing[0]!r} "
                                 f"(served: {sorted(models)})")
            missing = unserved([ensemble.gate.model, *ensemble.gate.members]) if ensemble.gate else []
            if missing:
                raise ValueError(f"ensemble {ensemble.name!r}: its gate names a model that is not served: "
                                 f"{missing[0]!r} (served: {sorted(models)})")
        return self

    @model_validator(mode="after")
    def _device(self) -> "ServeConfig":
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device {self.device!r} is not one of auto, cpu, cuda, cuda:N")
        return self

    @model_validator(mode="after")
    def _tls_pairs(self) -> "ServeConfig":
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        return self


# Flag spellings beside `--field-name` (vLLM's and TEI's names for the same settings).
FLAG_ALIASES: dict[str, tuple[str, ...]] = {"api_keys": ("--api-key",)}


TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def _coerce(value: Any, annotation: Any) -> Any:
    if annotation in (bool, "bool"):  # an environment variable's text, or a --flag / --no-flag's bool as it is
        if isinstance(value, bool):
            return value
        text = value.strip().lower()
        if text not in TRUE_WORDS + FALSE_WORDS:  # a typo ("flase") must not quietly mean false
            raise ValueError(f"not a boolean: {value!r} (use one of {', '.join(TRUE_WORDS + FALSE_WORDS)})")
        return text in TRUE_WORDS
    if annotation == list[str]:
        values = value if isinstance(value, list) else [value]  # a repeated flag gives a list (of lists: nargs)
        flat = [v for item in values for v in (item if isinstance(item, list) else [item])]
        return [part.strip() for v in flat for part in str(v).split(",") if part.strip()]
    return value


def load_file(path: str | os.PathLike) -> dict[str, Any]:
    text = Path(path).read_text()
    if str(path).endswith((".yaml", ".yml")):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"config file {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    else:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"config file {path} is not valid JSON ({exc}; a YAML file must end in .yaml or "
                             ".yml)") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping")
    return data


def from_env(environ: dict[str, str] | None = None) -> dict[str, Any]:
    environ = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for name, field in ServeConfig.model_fields.items():
        key = ENV_PREFIX + name.upper()
        if key in environ:
            try:
                out[name] = _coerce(environ[key], field.annotation)
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
            if name == "api_keys" and not out[name]:  # e.g. an empty Kubernetes secret: never auth switched off
                raise ValueError(f"{key} is set but holds no key: set keys, or unset it to serve without "
                                 "authentication")
    return out


OTHER_ENV = frozenset({
    "REWARDSERVE_URL", "REWARDSERVE_API_KEY", "REWARDSERVE_TIMEOUT", "REWARDSERVE_TRANSPORT", "REWARDSERVE_INPUT",
    "REWARDSERVE_STRIP", "REWARDSERVE_REWARD_MODEL", "REWARDSERVE_GENERATOR_API_KEY", "REWARDSERVE_CACHE",
    "REWARDSERVE_ALLOCATOR", "REWARDSERVE_ALLOCATOR_EXEC", "REWARDSERVE_MALLOC_TRIM_S",
})
"""REWARDSERVE_* variables that are not config fields: the clients' and adapters', the Best-of-N generator's key,
the policy cache folder and the process's allocator settings. Any other unknown one is warned about at start."""

CONFIG_FILE_ONLY = ("models", "ensembles")
"""Fields only a config file sets (lists of objects); `models` also comes from a repeated `--model NAME=SPEC`."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field; defaults are None so that only flags given override env and file."""
    lists = " ".join(f"`{name}`: {ServeConfig.model_fields[name].description}" for name in CONFIG_FILE_ONLY)
    parser.add_argument("--config", help=f"YAML or JSON config file (fields as below, and: {lists})")
    for name, field in ServeConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        helptext = f"{field.description or ''} (default: {field.default!r}; env {ENV_PREFIX}{name.upper()})"
        flags = [*FLAG_ALIASES.get(name, ()), flag]
        if name in CONFIG_FILE_ONLY:
            continue
        if name == "model":
            parser.add_argument(flag, dest=name, action="append", default=None, help=helptext)
            continue
        if field.annotation is bool:
            parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=None, help=helptext)
        elif field.annotation == list[str]:  # repeatable; each value may also be comma-separated
            parser.add_argument(*flags, dest=name, action="append", nargs="+", default=None, help=helptext)
        else:
            parser.add_argument(*flags, dest=name, default=None, help=helptext)


def resolve(args: argparse.Namespace | None = None, environ: dict[str, str] | None = None) -> ServeConfig:
    data: dict[str, Any] = {}
    config_file = getattr(args, "config", None) if args is not None else None
    if config_file:
        data.update(load_file(config_file))
    env = from_env(environ)
    if "model" in env:  # REWARDSERVE_MODEL replaces the file's models and their ensembles, as --model does
        _replace_models(data, env.pop("model"))
    data.update(env)
    if args is not None:
        for name in ServeConfig.model_fields:
            value = getattr(args, name, None)
            if value is None:
                continue
            if name == "model":  # the command line's models replace the file's, with the ensembles over them
                _replace_models(data, value)
                continue
            data[name] = _coerce(value, ServeConfig.model_fields[name].annotation)
    return ServeConfig.model_validate(data)


def _replace_models(data: dict[str, Any], values: str | list[str]) -> None:
    """`--model` / REWARDSERVE_MODEL: their models replace the config's, and the ensembles over the config's."""
    for key in ("model", "models", "ensembles"):
        data.pop(key, None)
    data.update(model_flags(values))


def model_flags(values: str | list[str]) -> dict[str, Any]:
    """`--model SPEC` (one, unnamed): the `model` field; repeated or `NAME=SPEC`: the `models` list. A value may
    hold several comma-separated entries (`a=default,b=helpful`), as REWARDSERVE_MODEL does, unless it is an
    existing path with a comma in its name."""
    values = [values] if isinstance(values, str) else list(values)
    values = [part for value in values for part in ([value] if Path(value).exists() else value.split(","))]
    if len(values) == 1 and "=" not in values[0]:
        return {"model": values[0]}
    entries = []
    for value in values:
        name, sep, spec = value.partition("=")
        if not sep:
            name, spec = Path(value).name or value, value
        entries.append({"name": name, "path": spec})
    return {"models": entries}
