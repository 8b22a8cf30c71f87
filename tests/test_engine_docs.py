"""docs/engine.md's examples run as written: the online time scale, the bf16 engine, pausing,
long prompts, metrics."""

from __future__ import annotations

import ast
import contextlib
import io
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "engine.md"


def _run_block_with(marker: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    (code,) = [block for block in blocks if marker in block]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(DOC), "exec"), {"__name__": "docs_example"})
    return out.getvalue()


def test_the_time_scale_example_runs_and_prints_the_factor() -> None:
    printed = _run_block_with("time_scale")
    assert re.fullmatch(r"iterations run \d+\.\d\dx the calibrated time\n", printed)


def test_the_bf16_example_runs() -> None:
    assert _run_block_with('dtype="bfloat16"') == "4 tokens in bf16\n"


def test_the_pausing_example_pauses_the_long_iteration_for_the_chat() -> None:
    printed = _run_block_with("pause_iterations=True")
    # 1 unless the long iteration's first layer was done before the chat arrived (a loaded
    # machine); tests/test_engine_pausing.py checks pausing with layers slow enough to be sure.
    assert re.fullmatch(r"pauses: [01], chat TTFT \d+ ms\n", printed)


def test_the_sampling_example_prints_each_token_with_its_two_most_likely() -> None:
    lines = _run_block_with("repetition_penalty=1.3").splitlines()
    assert len(lines) == 4
    for line in lines:
        match = re.fullmatch(
            r"(\d+) \((-?\d+\.\d\d)\); most likely (\d+): (-?\d+\.\d\d), (\d+): (-?\d+\.\d\d)", line
        )
        assert match is not None, line
        assert float(match[4]) >= float(match[6])  # most likely first


def test_the_special_tokens_example_shows_the_markers_only_without_skipping() -> None:
    hidden, shown = (
        ast.literal_eval(line)
        for line in _run_block_with("skip_special_tokens=False").split("\n")[:2]
    )
    assert "<|im_start|>" in shown and shown.replace("<|im_start|>", "") == hidden


def test_the_truncation_example_runs_the_end_of_a_prompt_beyond_the_context() -> None:
    assert _run_block_with("truncate_prompt_tokens=200)") == "ran 200 of 400 prompt tokens\n"


def test_the_generation_config_example_prints_no_defaults() -> None:
    assert _run_block_with('generation_config="vllm"') == "{}\n"


def test_the_bad_words_example_runs() -> None:
    assert (
        _run_block_with('bad_words=["the"') == "8 tokens, without 'the' or ' of' as their tokens\n"
    )


def test_the_prefix_caching_example_reuses_the_document_and_each_turn() -> None:
    # Each turn's KV reaches its answer's last token but one: 32, then 64 tokens of full blocks.
    assert _run_block_with("prefix_cache_hit_tokens") == (
        "prompt tokens from the cache: 400\n"
        "turn 0: 0 of 3 prompt tokens from the cache\n"
        "turn 1: 32 of 35 prompt tokens from the cache\n"
        "turn 2: 64 of 67 prompt tokens from the cache\n"
    )


def test_the_prompt_scoring_example_prints_what_the_model_computes() -> None:
    import math

    import torch

    from medha.model.runner import StepSeq
    from medha.model.setup import build_runner

    printed = _run_block_with("prompt_logprobs=0")
    runner, _ = build_runner("tiny-random", num_blocks=64)

    def log_probs(ids: list[int]) -> torch.Tensor:
        blocks = list(range(-(-len(ids) // runner.block_size)))
        logits = runner.step([StepSeq(ids, 0, blocks)], all_logits=True)
        return logits.log_softmax(-1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]

    text = log_probs(list(range(5, 205)))
    context = [11, 12, 13, 14, 15]
    totals = [float(log_probs(context + c)[4:].sum()) for c in ([16, 17], [30, 31], [40, 41])]
    best = max(range(3), key=totals.__getitem__)
    blocks = [0]
    after_context = runner.step([StepSeq(context, 0, blocks)], all_logits=True)[-1]
    top = after_context.topk(2).indices.tolist()
    assert printed == (
        f"perplexity {math.exp(-float(text.mean())):.2f}\n"
        f"choice {best}: log-likelihood {totals[best]:.2f}\n"
        f"most likely after the context: {top}\n"
    )


def test_the_structured_outputs_example_prints_a_valid_tool_call() -> None:
    assert _run_block_with("TOOL_CALL") == "['argument', 'tool'] True stop\nTrue\n"


def test_the_long_prompt_example_prints_what_the_docs_say() -> None:
    doc = DOC.read_text(encoding="utf-8")
    section = doc[doc.index("## Long prompts") : doc.index("## Cancellation and errors")]
    printed = re.findall(r"prints\n\n```\n(.*?)```", section, re.S)
    assert _run_block_with("quarterly report") == printed[0]


def test_the_metrics_example_prints_what_the_docs_say() -> None:
    doc = DOC.read_text(encoding="utf-8")
    section = doc[doc.index("## Metrics (Prometheus)") : doc.index("## Config errors")]
    printed = re.findall(r"prints\n\n```\n(.*?)```", section, re.S)
    assert _run_block_with("A request its client leaves") == printed[0]


def test_the_thinking_first_example_thinks_then_answers_the_choice() -> None:
    assert _run_block_with("thinking=medha.Thinking") == "True True stop\n"


def test_the_cache_salt_example_shares_a_prefix_only_within_a_tenant() -> None:
    printed = _run_block_with("cache_salt=tenant")
    assert printed.splitlines() == [
        "acme: 0 prompt tokens from the cache",
        "globex: 0 prompt tokens from the cache",
        "acme: 96 prompt tokens from the cache",
    ]
