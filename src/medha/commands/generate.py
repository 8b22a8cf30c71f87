"""`medha generate MODEL PROMPT`: stream one completion to stdout."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from medha.errors import InvalidRequestError, PromptTooLongError


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "generate",
        help="stream a completion of one prompt",
        description="Stream a completion of PROMPT by MODEL (a preset name, an HF checkpoint "
        "folder or a .gguf file).",
    )
    p.add_argument("model", help="smollm2-135m, tiny-random, an HF folder or a .gguf file")
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--attention", default="auto", help="attention backend (default: auto)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medha.model.setup import build_runner
    from medha.model.single import generate_single
    from medha.sampling import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    # As the engine: an empty text prompt is refused, though the tokenizer would give it a BOS
    # token. With --chat the template around an empty message is a prompt.
    if not args.prompt and not args.chat:
        raise InvalidRequestError("the prompt is empty")
    runner, tokenizer = build_runner(
        args.model,
        max_tokens=args.max_tokens,
        dtype=args.dtype,
        device=args.device,
        attention_backend=args.attention,
    )
    if args.chat:
        messages = [{"role": "user", "content": args.prompt}]
        if args.system is not None:
            messages.insert(0, {"role": "system", "content": args.system})
        prompt_ids = tokenizer.apply_chat_template(messages)
    else:
        prompt_ids = tokenizer.encode(args.prompt)
    _check_context(len(prompt_ids), params.max_tokens, runner.arch.context_len)
    for token in generate_single(runner, prompt_ids, params, tokenizer, tokenizer.eos_token_ids):
        sys.stdout.write(token.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _check_context(prompt_len: int, max_tokens: int, context: int) -> None:
    """Refuse what no engine accepts (its max_model_len stops at the model's context): the
    positions past it were never trained, so what the model writes there is noise."""
    if prompt_len + max_tokens > context:
        raise PromptTooLongError(
            f"the prompt has {prompt_len} tokens and --max-tokens is {max_tokens}: "
            f"{prompt_len + max_tokens} tokens exceed the model's context of {context}"
        )
