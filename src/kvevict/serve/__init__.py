"""`kvevict serve`: an OpenAI-compatible server whose freed KV memory becomes more requests running at once.

engine.py runs the requests (continuous batching, admission by KV bytes, preemption), memory.py predicts each
request's peak bytes, app.py is the HTTP API, metrics.py the Prometheus metrics, loadgen.py the load generator
(`kvevict bench serve`). Needs the `serve` extra: pip install "kvevict[serve]".
"""

from __future__ import annotations

import logging
import warnings


def build(model_name: str, policy, kv_budget: int, prefill_chunk: int = 256, dtype: str = "float32",
          device: str = "cpu"):
    """Load the model and make the app (FastAPI) with its engine started."""
    from ..models import context_window, load_model
    from .app import Served, build_app
    from .engine import Engine
    from .metrics import Metrics

    model, tokenizer = load_model(model_name, dtype=dtype, device=device)
    config = model.config.get_text_config(decoder=True)
    metrics = Metrics(model_name, kv_budget)
    engine = Engine(model, tokenizer, kv_budget=kv_budget, prefill_chunk=prefill_chunk, metrics=metrics)
    served = Served(engine=engine, tokenizer=tokenizer, model_name=model_name, policy=policy,
                    context_window=context_window(model_name) or getattr(config, "max_position_embeddings", None))
    engine.estimate(engine.effective_policy(policy), 1, 1)  # calibrate the default policy before the first request
    engine.start()
    return build_app(served), engine


def serve(model_name: str, policy, kv_budget: int, host: str = "127.0.0.1", port: int = 8000, prefill_chunk: int = 256,
          dtype: str = "float32", device: str = "cpu") -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # short prompts keep their protected tokens; said once per request, it would flood the log
    warnings.filterwarnings("ignore", message=r".*protected tokens .* exceed the target", category=UserWarning)
    app, engine = build(model_name, policy, kv_budget, prefill_chunk, dtype, device)
    log = logging.getLogger("kvevict.serve")
    log.info("serving %s with %s, KV budget %s bytes, on http://%s:%s", model_name, policy.describe(), f"{kv_budget:,}",
             host, port)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        engine.shutdown()
