"""`medha generate MODEL PROMPT`: stream one completion to stdout."""

from __future__ import annotations

import argparse
import codecs
import os
import sys
from typing import TYPE_CHECKING, Any

from medha.commands.user_errors import UsageError
from medha.errors import InvalidRequestError, PromptTooLongError
from medha.request_input import check_unicode

if TYPE_CHECKING:
    from medha.structured_outputs import StructuredOutputsParams

BLOCK_SIZE = 16
STDIN = "-"


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "generate",
        help="stream a completion of one prompt",
        description="Stream a completion of PROMPT by MODEL (a preset name, an HF checkpoint "
        "folder or a .gguf file). PROMPT - reads it from standard input, as UTF-8: a long "
        "document (medha generate smollm2-135m --chat - < report.txt).",
    )
    p.add_argument("model", help="smollm2-135m, tiny-random, an HF folder or a .gguf file")
    p.add_argument("prompt", help="the prompt's text, or - to read it from standard input")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--max-tokens", type=int, default=128, help="(default: 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="(default: 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="(default: 0, off)")
    p.add_argument("--min-p", type=float, default=0.0, help="(default: 0.0, off)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--min-tokens", type=int, default=0, help="before eos or a stop may end it")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="in [-2, 2]")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="in [-2, 2]")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", default=None, help="the output is JSON valid under it")
    shape.add_argument("--json-object", action="store_true", help="the output is a JSON object")
    shape.add_argument("--regex", default=None, help="the output matches this regex")
    shape.add_argument("--choice", action="append", default=None, help="one of (repeatable)")
    shape.add_argument(
        "--grammar", default=None, help="a Lark grammar (rule `start`) or a GBNF one (rule `root`)"
    )
    p.add_argument("--disable-any-whitespace", action="store_true", help="JSON without whitespace")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--attention", default="auto", help="attention backend (default: auto)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medha.model.device import check_device
    from medha.model.loader import load_checkpoint
    from medha.model.setup import checkpoint_runner
    from medha.model.single import generate_single
    from medha.sampling import SamplingParams

    structured = _structured_outputs(args)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
        stop=tuple(args.stop),
        min_tokens=args.min_tokens,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        structured_outputs=structured,
    )
    if args.system is not None and not args.chat:
        raise UsageError("--system goes into the chat template: add --chat")
    if args.prompt == STDIN:  # after the options' checks: reading may wait for a terminal
        args.prompt = _read_stdin()
    # As the engine: an empty text prompt is refused, though the tokenizer would give it a BOS
    # token. With --chat the template around an empty message is a prompt.
    if not args.prompt and not args.chat:
        raise InvalidRequestError("the prompt is empty")
    # A terminal in another encoding hands Python bytes it cannot decode: refused here,
    # before the model loads, not as the tokenizer's TypeError.
    check_unicode(args.prompt, "the prompt")
    for text, what in ((args.system, "--system"), *((stop, "--stop") for stop in args.stop)):
        if text is not None:
            check_unicode(text, what)
    device = check_device(args.device)
    checkpoint = load_checkpoint(args.model)
    tokenizer = checkpoint.tokenizer
    if args.chat:
        messages = [{"role": "user", "content": args.prompt}]
        if args.system is not None:
            messages.insert(0, {"role": "system", "content": args.system})
        prompt_ids = tokenizer.apply_chat_template(messages)
    else:
        prompt_ids = tokenizer.encode(args.prompt)
    _check_vocabulary(prompt_ids, checkpoint.arch.vocab_size)
    _check_context(len(prompt_ids), params.max_tokens, checkpoint.arch.context_len)
    # A KV cache for this request, not for the model's whole context (128K tokens of
    # Llama-3.1-8B would be 16 GiB in bf16).
    needed_blocks = -(-(len(prompt_ids) + params.max_tokens) // BLOCK_SIZE)
    grammar = None
    if structured is not None:
        from medha.grammar import GrammarCompiler

        compiler = GrammarCompiler(tokenizer, checkpoint.arch.vocab_size)
        grammar = compiler.matcher(structured)
    runner = checkpoint_runner(
        checkpoint, device, needed_blocks, BLOCK_SIZE, args.dtype, args.attention
    )
    try:
        for token in generate_single(
            runner, prompt_ids, params, tokenizer, tokenizer.eos_token_ids, grammar=grammar
        ):
            sys.stdout.write(token.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # `medha generate ... | head`: the reader left. End quietly, as a writer the pipe
        # kills would, and keep Python's flush at exit from failing a second time.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # 128 + SIGPIPE: what a shell reports for such a writer
    return 0


def _structured_outputs(args: argparse.Namespace) -> StructuredOutputsParams | None:
    """The shape the output must take, from --json-schema, --json-object, --regex, --choice
    or --grammar (at most one); None without one."""
    from medha.structured_outputs import StructuredOutputsParams

    compact = args.disable_any_whitespace
    if args.json_schema is not None:
        return StructuredOutputsParams(json=args.json_schema, disable_any_whitespace=compact)
    if args.json_object:
        return StructuredOutputsParams(json_object=True, disable_any_whitespace=compact)
    if compact:
        raise UsageError("--disable-any-whitespace shapes JSON: add --json-schema or --json-object")
    if args.regex is not None:
        return StructuredOutputsParams(regex=args.regex)
    if args.choice is not None:
        return StructuredOutputsParams(choice=tuple(args.choice))
    if args.grammar is not None:
        return StructuredOutputsParams(grammar=args.grammar)
    return None


def _read_stdin() -> str:
    """The prompt piped in: a document too long for a command line. UTF-8 whatever the
    locale says (a file's encoding is not the terminal's), without a BOM."""
    if sys.stdin is None:  # started with standard input closed
        raise UsageError("PROMPT is - but there is no standard input to read it from")
    if sys.stdin.isatty():
        print("medha: reading the prompt from standard input (end it with Ctrl-D)", file=sys.stderr)
    data = sys.stdin.buffer.read()
    text = data.removeprefix(codecs.BOM_UTF8)
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError as exc:
        at = exc.start + len(data) - len(text)  # an offset into what was sent, BOM included
        raise InvalidRequestError(
            f"the prompt from standard input is not UTF-8 (byte {at}: "
            f"{data[at : at + 1]!r}); encode it as UTF-8"
        ) from None


def _check_vocabulary(prompt_ids: list[int], vocab_size: int) -> None:
    """As the engine: text spelling a token the tokenizer has and the model lacks is refused."""
    beyond = [token for token in prompt_ids if token >= vocab_size]
    if beyond:
        raise InvalidRequestError(
            f"the prompt's text encodes to token ids the model does not have: {beyond} "
            f"(its vocabulary is [0, {vocab_size}))"
        )


def _check_context(prompt_len: int, max_tokens: int, context: int) -> None:
    """Refuse what no engine accepts (its max_model_len stops at the model's context): the
    positions past it were never trained, so what the model writes there is noise."""
    if prompt_len + max_tokens > context:
        raise PromptTooLongError(
            f"the prompt has {prompt_len} tokens and --max-tokens is {max_tokens}: "
            f"{prompt_len + max_tokens} tokens exceed the model's context of {context}"
        )
