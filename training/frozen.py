"""A frozen base for head-only training: the head it feeds (decoder `score`, or BERT pooler + classifier), the
features that head reads, and the key a feature store is filed under (training/features.py).

Shared by the head-only trainer (training/rm_head.py), the feature pass (training/features.py) and the multi-head
tools (training/heads.py); it imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch

from rewardmodel.modeling import (
    ModelSource, has_decoder_head, load_reward_model, load_tokenizer, resolve_model, sha256_file,
)
from rewardmodel.rendering import model_max_length
from training.data import PreferenceCollator, PreferencePair


def store_key(base_sha256: str, max_length: int, num_layers: int | None, kind: str) -> dict[str, Any]:
    return {"base_sha256": base_sha256, "max_length": max_length, "num_layers": num_layers, "kind": kind}



def overlay_base_spec(spec: str) -> str:
    if spec in ("minilm", "smollm2"):
        return spec
    raise ValueError("--head-only exports an overlay over a packaged base: use --base minilm or --base smollm2")


def store_kind(kind: str, read_layers: Sequence[int] | None) -> str:
    """What a feature store is filed under besides base digest, length and layer cut: the head kind, or the layers
    read (features of several layers, `--read-layers`)."""
    return "layers:" + ",".join(map(str, read_layers)) if read_layers else kind


def layer_part(feats: torch.Tensor | None, reads: Sequence[int], layer: int | None) -> torch.Tensor | None:
    """The slice of (.., len(reads) * H) features that layer `layer` fills (all of it without reads / layer)."""
    if feats is None or not reads or layer is None:
        return feats
    width = feats.shape[-1] // len(reads)
    i = list(reads).index(layer)
    return feats[..., i * width:(i + 1) * width]


FEATURE_BATCH = 8  # rows per frozen forward (length-sorted, so little padding)


class Head:
    """The trainable head of a reward model, applied to cached features (N, H) -> rewards (N,).

    read_layers (decoder bases): the features are the last token's hidden state after each of these layer counts,
    each through the final norm (what a head with that `head_layers` entry reads when served), concatenated:
    (N, len(read_layers) * H). Such features are for linear heads fit per layer (training/head_overlays.py)."""

    def __init__(self, model: Any, read_layers: Sequence[int] | None = None):
        self.model = model
        self.base = getattr(model, model.base_model_prefix)
        self.read_layers = tuple(read_layers) if read_layers else None
        if has_decoder_head(model):
            self.kind, self.modules = "decoder", {"score": model.score}
        elif getattr(self.base, "pooler", None) is not None and isinstance(getattr(model, "classifier", None),
                                                                            torch.nn.Linear):
            pooler_name = f"{model.base_model_prefix}.pooler"
            self.kind, self.modules = "pooler", {pooler_name: self.base.pooler, "classifier": model.classifier}
        else:
            raise ValueError(
                f"--head-only supports decoder heads (`score`) and BERT-style pooler + linear classifier heads, "
                f"not {type(model).__name__}"
            )
        if self.read_layers:
            loaded = int(model.config.num_hidden_layers)
            if self.kind != "decoder":
                raise ValueError("--read-layers needs a decoder base (smollm2)")
            wrong = [k for k in self.read_layers if not 1 <= k <= loaded]
            if wrong or len(set(self.read_layers)) != len(self.read_layers):
                raise ValueError(f"--read-layers {list(self.read_layers)}: distinct layer counts from 1 to {loaded} "
                                 "(the base's layers)")

    @property
    def store_kind(self) -> str:
        """What a feature store of this head's features is filed under (with the base digest, length, layers)."""
        return store_kind(self.kind, self.read_layers)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in self.modules.values() for p in m.parameters()]

    @torch.no_grad()
    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids=input_ids, attention_mask=attention_mask,
                        output_hidden_states=bool(self.read_layers))
        hidden = out.last_hidden_state  # (B, T, H), after the final norm
        if self.kind != "decoder":
            return hidden[:, 0].float()  # (B, H)
        rows = torch.arange(hidden.shape[0])
        last = attention_mask.long().sum(-1) - 1  # (B,)
        if not self.read_layers:
            return hidden[rows, last].float()  # (B, H)
        loaded = len(out.hidden_states) - 1  # hidden_states: the embeddings, then each layer's output
        return torch.cat([(hidden[rows, last] if k == loaded else self.base.norm(out.hidden_states[k][rows, last]))
                          .float() for k in self.read_layers], -1)  # (B, layers * H)

    def rewards(self, feats: torch.Tensor) -> torch.Tensor:
        if self.kind == "decoder":
            return self.model.score(feats)[:, 0]  # (N,)
        pooled = self.base.pooler(feats[:, None, :])  # the pooler reads token 0 of (N, 1, H)
        return self.model.classifier(pooled)[:, 0]  # (N,)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{k}": v.detach().clone().contiguous().float()
                for name, module in self.modules.items() for k, v in module.state_dict().items()}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        own = self.model.state_dict()
        with torch.no_grad():
            for key, value in state.items():
                own[key].copy_(value)


def cache_features(head: Head, collate: PreferenceCollator, pairs: Sequence[PreferencePair],
                   progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """(P, 2, H) features of every pair's (chosen, rejected), one frozen pass, length-sorted batches."""
    rows = [e.input_ids for p in pairs for e in collate.encode(p)]  # 2P rows: chosen, rejected, chosen, ...
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out: list[torch.Tensor | None] = [None] * len(rows)
    for start in range(0, len(order), FEATURE_BATCH):
        idx = order[start:start + FEATURE_BATCH]
        width = max(len(rows[i]) for i in idx)
        ids = torch.full((len(idx), width), collate.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for j, i in enumerate(idx):
            ids[j, : len(rows[i])] = torch.tensor(rows[i])
            mask[j, : len(rows[i])] = 1
        for j, f in zip(idx, head.features(ids, mask)):
            out[j] = f
        if progress:
            progress(len(idx))
    return torch.stack(out).view(len(pairs), 2, -1)  # type: ignore[arg-type]


@dataclass
class Frozen:
    """A frozen base ready for the feature pass: its source, tokenizer, model, head and collator."""

    source: ModelSource
    tokenizer: Any
    model: Any
    head: Head
    collate: PreferenceCollator
    max_length: int
    store_key: dict[str, Any]


def load_frozen(base_spec: str, max_length: int | None, num_layers: int | None = None,
                read_layers: Sequence[int] | None = None) -> Frozen:
    """The packaged base (minilm | smollm2), optionally cut to its first num_layers, frozen, in fp32 on the CPU;
    read_layers: features of several layers (Head)."""
    source = resolve_model(overlay_base_spec(base_spec))
    if num_layers:
        if base_spec != "smollm2":
            raise ValueError("--num-layers applies to decoder bases (smollm2)")
        source = replace(source, num_layers=num_layers)
    return frozen_from_source(source, max_length, read_layers)


def frozen_from_source(source: ModelSource, max_length: int | None, read_layers: Sequence[int] | None = None) -> Frozen:
    """A frozen base from any source (tests use tiny models from configs)."""
    tokenizer = load_tokenizer(source)
    model = load_reward_model(source, torch.float32, "cpu")
    for p in model.parameters():
        p.requires_grad_(False)
    head = Head(model, read_layers)
    cap = model_max_length(tokenizer, model.config, max_length or 0)
    key = store_key(sha256_file(source.weights_file()), cap, source.num_layers, head.store_kind)
    return Frozen(source, tokenizer, model, head, PreferenceCollator(tokenizer, cap), cap, key)
