"""The policy over an OpenAI-compatible API on a CPU: `/v1/models` and `/v1/chat/completions`.

Generation is the training rollout's own backend (`agent_system.agent_loop.cpu_server.CPUServerManager`: the
same sampling, batching of concurrent requests and constrained decoding), so what a search gets from the
policy is what training sampled from it. With a grammar (`canvas-answer` or `canvas-code`, the canvas action
space), every answer is one canvas action that parses, as in training.

    python -m agent_system.policy.server MODEL_DIR --port 8849 [--model-name NAME] [--grammar canvas-answer]

prints `ready <base_url> <model name>` once it accepts requests (`agent_system.policy.serving` waits for it).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from typing import Any


def text_name(model_name: str) -> str:
    return f"{model_name}:text"


def build_app(manager: Any, model_name: str, grammar: str | None):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from agent_system.constrained import token_constraint

    tokenizer = manager.tokenizer
    constraint = token_constraint(tokenizer, grammar) if grammar else None
    # with a grammar, `NAME` answers canvas edits and `NAME:text` the same model unconstrained (a model value
    # asked for a number, say); without one, `NAME` is unconstrained
    constraints = {model_name: constraint, **({text_name(model_name): None} if constraint is not None else {})}
    app = FastAPI(title="aflow-rl policy")

    def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind}})

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "aflow-rl"} for name in constraints]}

    @app.post("/v1/chat/completions")
    async def chat(body: dict) -> Any:
        if body.get("model") not in constraints:
            return error(404, f"model {body.get('model')!r} is not served here (this server serves "
                              f"{', '.join(constraints)})", "model_not_found")
        constraint = constraints[body["model"]]
        if body.get("stream"):
            return error(400, "streaming is not supported")
        if int(body.get("n") or 1) != 1:
            return error(400, "only n=1 is supported")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return error(400, "messages must be a non-empty list")
        try:
            prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids"):
                prompt_ids = prompt_ids["input_ids"]
            params = {k: body[k] for k in ("temperature", "top_p", "seed", "stop", "presence_penalty",
                                           "frequency_penalty") if body.get(k) is not None}
            params["max_tokens"] = body.get("max_completion_tokens") or body.get("max_tokens") or 1024
            if constraint is not None:
                params["aflow_grammar"] = grammar
            output = await manager.generate(uuid.uuid4().hex, prompt_ids=list(prompt_ids), sampling_params=params)
        except (ValueError, TypeError) as exc:  # e.g. a prompt longer than the model's context
            return error(400, " ".join(str(exc).split()))
        tokens = list(output.token_ids)
        text = constraint.text(tokens) if constraint is not None else tokenizer.decode(tokens, skip_special_tokens=True)
        finish = "stop" if tokens and tokens[-1] in manager.eos_token_ids else "length"
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": len(tokens),
                      "total_tokens": len(prompt_ids) + len(tokens)},
        }

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent_system.policy.server", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--port", type=int, default=8849)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model-name", default=None)
    parser.add_argument("--grammar", default=None, help="canvas-answer | canvas-code (default: unconstrained)")
    args = parser.parse_args(argv)

    import uvicorn

    from agent_system.agent_loop.cpu_server import CPUServerManager

    manager = CPUServerManager(model_path=args.model_dir, response_length=1024)
    name = args.model_name or args.model_dir.rstrip("/").split("/")[-1]
    app = build_app(manager, name, args.grammar)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"))

    async def serve() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            print(f"ready http://{args.host}:{args.port}/v1 {name}", flush=True)
        await task

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
