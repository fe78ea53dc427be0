"""Naive per-request reward servers, the baselines of bench/serve.py: one pair per forward, no batching.

    python bench/naive_servers.py --mode async      --model minilm --dtype float32 --port 8100
    python bench/naive_servers.py --mode threadpool --model minilm --dtype float32 --port 8101

- `async`: tokenize + forward inline in an `async def` FastAPI handler, on the event loop (the pattern of
  OpenRLHF's serve_rm): requests are served strictly one after the other.
- `threadpool`: the same work in a plain `def` handler, which FastAPI runs in its thread pool: several
  forwards run at once, each with the torch intra-op threads, competing for the cores.

Everything else is rewardserve's: model loading (`rewardmodel.modeling`: same weights, same seeded untrained
head), rendering (`rewardmodel.rendering.encode_input`, same max length), the request body and response shape of
`POST /v1/score`, uvicorn with access log off, OMP_WAIT_POLICY=PASSIVE and TOKENIZERS_PARALLELISM=false set
before torch is imported, and the same torch thread count (`--threads`).

(No `from __future__ import annotations` here: FastAPI must see the real types of the handlers, which are
defined inside `build_app`.)
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported, as rewardserve.cli does
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _die_with_parent() -> None:
    """Linux: get SIGTERM if the bench that started us dies without stopping us."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 15)  # PR_SET_PDEATHSIG, SIGTERM
        except OSError:
            pass


def build_app(mode: str, model_spec: str, dtype: str, threads: int) -> Any:
    import torch
    from fastapi import FastAPI
    from pydantic import BaseModel, Field

    from rewardmodel.modeling import load_reward_model, load_tokenizer, resolve_model, reward_forward
    from rewardmodel.rendering import encode_input, model_max_length
    from service.schemas import ScoreInput

    if threads > 0:
        torch.set_num_threads(threads)
    source = resolve_model(model_spec)
    tokenizer = load_tokenizer(source)
    model = load_reward_model(source, getattr(torch, dtype), "cpu")
    max_length = model_max_length(tokenizer, model.config)

    def score_one(inp: Any) -> dict[str, Any]:
        enc = encode_input(tokenizer, inp, max_length)
        ids = torch.tensor([enc.input_ids], dtype=torch.long)  # (1, T)
        with torch.inference_mode():
            reward = reward_forward(model, ids, torch.ones_like(ids))[0].item()
        return {"reward": reward, "truncated": enc.truncated, "tokens": enc.tokens}

    class ScoreRequest(BaseModel):
        model: str | None = None
        inputs: list[ScoreInput] = Field(min_length=1)

    for _ in range(2):  # like rewardserve's warm-up before ready
        score_one({"prompt": "Hello", "response": "Hi! How can I help?"})

    app = FastAPI(title=f"naive-{mode}")
    if mode == "async":

        @app.post("/v1/score")
        async def score_async(body: ScoreRequest) -> dict[str, Any]:
            return {"model": source.name, "scores": [score_one(inp) for inp in body.inputs]}

    else:

        @app.post("/v1/score")
        def score_threadpool(body: ScoreRequest) -> dict[str, Any]:
            return {"model": source.name, "scores": [score_one(inp) for inp in body.inputs]}

    @app.get("/ready")
    async def ready() -> dict[str, str]:
        return {"status": "ready", "model": source.name}

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("async", "threadpool"), required=True)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    _die_with_parent()

    import uvicorn

    app = build_app(args.mode, args.model, args.dtype, args.threads)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                lifespan="off", backlog=2048)
    return 0


if __name__ == "__main__":
    sys.exit(main())
