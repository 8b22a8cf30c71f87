"""`medha generate` streams a completion; every command reports a user's mistake in one line
(exit status 2) and keeps the traceback of a bug."""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pydantic
import pytest

from medha.calibration import mixed_validation_batches
from medha.cli import main, parse_args
from medha.commands import generate
from medha.commands.arg_types import policy_list
from medha.commands.demo import lars_against_fcfs
from medha.commands.user_errors import user_error_message
from medha.config import EngineConfig


def test_generate_prints_the_greedy_completion(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "tiny-random", "Hello world", "--max-tokens", "6"]) == 0
    first = capsys.readouterr().out
    assert main(["generate", "tiny-random", "Hello world", "--max-tokens", "6"]) == 0
    assert capsys.readouterr().out == first  # greedy: deterministic
    assert first.endswith("\n") and len(first.strip()) > 0


def test_generate_with_chat_template_and_sampling_seed(capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "generate",
        "tiny-random",
        "Hi",
        "--chat",
        "--temperature",
        "0.9",
        "--seed",
        "3",
        "--max-tokens",
        "5",
    ]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first


def test_generate_reports_bad_sampling_params(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "tiny-random", "Hi", "--top-p", "1.5"]) == 2
    assert "top_p" in capsys.readouterr().err
    assert main(["generate", "tiny-random", "Hi", "--presence-penalty", "3"]) == 2
    assert "presence_penalty" in capsys.readouterr().err


def test_generate_applies_penalties(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["generate", "tiny-random", "ab ab ab ab ab", "--max-tokens", "12"]
    outputs = []
    for extra in ([], ["--repetition-penalty", "1.8"], ["--frequency-penalty", "2"]):
        assert main([*base, *extra]) == 0
        outputs.append(capsys.readouterr().out)
    plain, *penalised = outputs
    assert all(output != plain for output in penalised)


def test_generate_shapes_the_output_with_a_schema_regex_choice_or_grammar(
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = ["generate", "tiny-random", "Hello", "--max-tokens", "40"]
    schema = json.dumps(
        {
            "type": "object",
            "properties": {"ok": {"type": "boolean"}},
            "required": ["ok"],
            "additionalProperties": False,
        }
    )
    shapes = {
        r'\{"ok":(true|false)\}': ["--json-schema", schema, "--disable-any-whitespace"],
        r"[0-9]{3}-[a-z]{2}": ["--regex", "[0-9]{3}-[a-z]{2}"],
        r"yes|no": ["--choice", "yes", "--choice", "no"],
        r"(ab)+": ["--grammar", 'start: "ab"+', "--max-tokens", "6"],
    }
    for pattern, extra in shapes.items():
        assert main([*base, *extra]) == 0
        printed = capsys.readouterr().out
        assert re.fullmatch(pattern + "\n", printed), (extra, printed)
    assert main([*base, "--regex", "[0-9"]) == 2
    error = capsys.readouterr().err
    assert "does not compile" in error and len(error.strip().splitlines()) == 1
    assert main([*base, "--regex", "a", "--disable-any-whitespace"]) == 2
    assert "add --json-schema or --json-object" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--regex", "a", "--choice", "a"])
    assert "not allowed with" in capsys.readouterr().err


def test_generate_reports_a_missing_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "/no/such/model", "Hi"]) == 2
    assert "/no/such/model" in capsys.readouterr().err


# -- user errors: one line, exit status 2; bugs keep their traceback ---------------------------


def _user_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run `medha argv`, check it failed as a user error should, and return its message."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("medha: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--attention", "bogus"], "unknown attention backend 'bogus'"),
        (["--device", "bogus"], "unknown device 'bogus'"),
        (["--device", "cuda:99"], "'cuda:99' is not available"),
        (["--max-tokens", "5000"], "tokens exceed the model's context of 4096"),
    ],
)
def test_generate_reports_what_cannot_run_in_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert message in _user_error(capsys, ["generate", "tiny-random", "Hi", *argv])


def test_generate_refuses_an_empty_prompt_as_the_engine_does(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert "the prompt is empty" in _user_error(capsys, ["generate", "tiny-random", ""])


def test_an_empty_chat_message_is_still_a_prompt(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "tiny-random", "", "--chat", "--max-tokens", "3"]) == 0


def _stdin(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="latin-1"))


def test_generate_reads_the_prompt_from_stdin_as_utf8(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = "Caf\u00e9 au lait, " * 40  # a document: longer than anyone types
    assert main(["generate", "tiny-random", text, "--max-tokens", "5"]) == 0
    expected = capsys.readouterr().out
    # UTF-8 whatever the stream's own encoding says (latin-1 here), with or without a BOM.
    for data in (text.encode(), b"\xef\xbb\xbf" + text.encode()):
        _stdin(monkeypatch, data)
        assert main(["generate", "tiny-random", "-", "--max-tokens", "5"]) == 0
        assert capsys.readouterr().out == expected


def test_generate_refuses_stdin_that_is_not_utf8_or_empty(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _stdin(monkeypatch, b"caf\xe9")
    message = _user_error(capsys, ["generate", "tiny-random", "-"])
    assert "standard input is not UTF-8 (byte 3: b'\\xe9')" in message
    _stdin(monkeypatch, b"\xef\xbb\xbfcaf\xe9")  # the offset counts the BOM too
    message = _user_error(capsys, ["generate", "tiny-random", "-"])
    assert "standard input is not UTF-8 (byte 6: b'\\xe9')" in message
    monkeypatch.setattr(sys, "stdin", None)
    assert "no standard input" in _user_error(capsys, ["generate", "tiny-random", "-"])
    # Options are checked before anything is read (a terminal would wait for its Ctrl-D).
    argv = ["generate", "tiny-random", "-", "--system", "x"]
    assert "add --chat" in _user_error(capsys, argv)
    _stdin(monkeypatch, b"")
    assert "the prompt is empty" in _user_error(capsys, ["generate", "tiny-random", "-"])


def test_demo_reports_a_missing_model_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = ["demo", "--model", "no-such-model", "--shorts", "1", "--out", str(tmp_path)]
    assert "no-such-model" in _user_error(capsys, argv)


def test_calibrate_reports_a_missing_model_and_writes_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "profiles" / "p.json"
    assert "no-such-model" in _user_error(capsys, ["calibrate", "no-such-model", "--out", str(out)])
    assert not out.exists()


def test_calibrate_checks_its_output_path_before_calibrating(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    argv = ["calibrate", "tiny-random", "--seconds", "60", "--out", str(blocker / "p.json")]
    started = time.perf_counter()
    assert f"cannot create the folder {blocker}" in _user_error(capsys, argv)
    assert time.perf_counter() - started < 30  # refused before the 60 s of timing
    argv = ["calibrate", "tiny-random", "--out", str(tmp_path)]
    assert "it is a folder" in _user_error(capsys, argv)
    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", "tiny-random", "--out", ""])
    assert exit_info.value.code == 2
    assert "argument --out: an empty path" in capsys.readouterr().err


def test_calibrate_refuses_a_cache_too_small_to_calibrate_on(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # It used to look forever for validation batches that fit in 32 tokens.
    argv = ["calibrate", "tiny-random", "--num-blocks", "2", "--out", str(tmp_path / "p.json")]
    assert "holds 32 tokens; calibration needs at least 2048 (--num-blocks 128)" in _user_error(
        capsys, argv
    )
    assert mixed_validation_batches(2, 16) == []
    assert 0 < len(mixed_validation_batches(128, 16)) <= 12


@pytest.mark.parametrize("seconds", ["-1", "0", "nan", "inf", "soon"])
def test_calibrate_refuses_a_time_budget_that_is_not_a_positive_number(
    capsys: pytest.CaptureFixture[str], seconds: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", "tiny-random", "--seconds", seconds])
    assert exit_info.value.code == 2
    assert "argument --seconds" in capsys.readouterr().err


@pytest.mark.parametrize("policies", ["bogus", "lars,nope", ","])
def test_demo_refuses_unknown_policies_before_running_any(
    capsys: pytest.CaptureFixture[str], policies: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--policies", policies])
    assert exit_info.value.code == 2
    assert "argument --policies" in capsys.readouterr().err


def test_demo_runs_each_policy_once_and_says_which_way_they_compare() -> None:
    assert policy_list("lars, fcfs,lars") == ["lars", "fcfs"]
    assert lars_against_fcfs(0.5, 2.0) == "lars is 4.0x lower than fcfs"
    assert lars_against_fcfs(1.0, 0.8) == "lars is 1.2x higher than fcfs"


@pytest.mark.parametrize(
    "argv", [["-v", "generate", "/no/such/model", "Hi"], ["generate", "/no/such/model", "Hi", "-v"]]
)
def test_verbose_adds_the_traceback_of_a_user_error(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("medha: error: ")


def test_verbose_counts_before_and_after_the_command() -> None:
    assert parse_args(["generate", "m", "p"]).verbose == 0
    assert parse_args(["-v", "generate", "m", "p"]).verbose == 1
    assert parse_args(["generate", "m", "p", "-vv"]).verbose == 2
    assert parse_args(["-vv", "generate", "m", "p", "-v"]).verbose == 3


@pytest.mark.parametrize("bug", [RuntimeError("boom"), ValueError("boom"), AssertionError()])
def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch, bug: Exception) -> None:
    def broken(args: argparse.Namespace) -> int:
        raise bug

    monkeypatch.setattr(generate, "run", broken)
    with pytest.raises(type(bug)):
        main(["generate", "tiny-random", "Hi"])


def test_a_config_validation_error_reads_as_one_line() -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        EngineConfig(model="tiny-random", policy="nope", kv_cache_gib=math.inf)  # type: ignore[arg-type]
    message = user_error_message(info.value)
    assert message is not None and "\n" not in message
    assert message.startswith("invalid EngineConfig: policy: ") and "kv_cache_gib: " in message


def test_calibrate_help_describes_the_command_in_whole_sentences(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["calibrate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "checks the fit on random mixed batches it was not fitted on and prints" in help_text


def test_generate_sizes_the_kv_cache_for_the_request_not_the_models_context(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A model made for 2**28 positions: a cache for its whole context would be 128 GiB."""
    from medha.model.presets import TINY_RANDOM_CONFIG, write_random_checkpoint

    config = {**TINY_RANDOM_CONFIG, "max_position_embeddings": 2**28}
    folder = write_random_checkpoint(tmp_path / "long-context", config, seed=0)
    assert main(["generate", str(folder), "Hello world", "--max-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()


def test_generate_refuses_text_encoding_to_ids_the_model_lacks(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the engine: a tokenizer may hold ids the model lacks (transformers' GGUF conversion
    adds <|endoftext|> to Llama-3 files). Here the model is said to lack the text's ids."""
    import dataclasses

    import medha.model.loader

    load = medha.model.loader.load_checkpoint

    def smaller_vocabulary(model: str) -> medha.model.loader.Checkpoint:
        checkpoint = load(model)
        return dataclasses.replace(checkpoint, arch=checkpoint.arch.replace(vocab_size=3))

    monkeypatch.setattr(medha.model.loader, "load_checkpoint", smaller_vocabulary)
    message = _user_error(capsys, ["generate", "tiny-random", "Hello world"])
    assert "token ids the model does not have" in message


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--engine", "nohostport"], {"RANK": "0", "WORLD_SIZE": "1"}, "argument --engine"),
        (["--engine", "h:1", "--timeout", "-1"], {"RANK": "0", "WORLD_SIZE": "1"}, "--timeout"),
        (["--engine", "h:1"], {"RANK": "x", "WORLD_SIZE": "1"}, "RANK='x'"),
    ],
)
def test_worker_arguments_are_checked_before_joining(
    argv: list[str], env: dict[str, str], message: str
) -> None:
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    done = subprocess.run(
        [sys.executable, "-m", "medha.cli", "worker", *argv],
        env={**environment, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_a_worker_whose_engine_never_comes_gives_up_after_its_timeout() -> None:
    # torch's rendezvous alone would wait 30 minutes.
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1"}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "medha.cli", "worker", "--engine", "127.0.0.1:9", "--timeout", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 4, done.stderr
    assert "did not let worker 0 of 1 join within 1 s" in done.stderr
    assert time.perf_counter() - started < 60


def test_generate_into_a_closed_pipe_exits_quietly() -> None:
    # `medha generate ... | head -c 5`: the reader leaves after 5 bytes.
    with subprocess.Popen(
        [sys.executable, "-m", "medha.cli", "generate", "tiny-random", "Hi", "--max-tokens", "300"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        process.stdout.read(5)
        process.stdout.close()
        err = process.stderr.read().decode()
        assert process.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_generate_refuses_text_that_is_not_utf8_and_a_system_prompt_without_chat(
    capsys: pytest.CaptureFixture[str],
) -> None:
    not_utf8 = b"caf\xe9".decode("utf-8", "surrogateescape")  # what Python makes of the argv
    assert "the prompt is not valid UTF-8" in _user_error(
        capsys, ["generate", "tiny-random", not_utf8]
    )
    argv = ["generate", "tiny-random", "hi", "--chat", "--stop", not_utf8]
    assert "--stop is not valid UTF-8" in _user_error(capsys, argv)
    argv = ["generate", "tiny-random", "hi", "--system", "be brief"]
    assert "--system goes into the chat template: add --chat" in _user_error(capsys, argv)


def test_demo_refuses_a_document_longer_than_the_context_before_running(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = ["demo", "--model", "tiny-random", "--long-tokens", "100000", "--shorts", "1"]
    message = _user_error(capsys, [*argv, "--policies", "lars", "--out", str(tmp_path)])
    assert "exceed the model's context of 4096 tokens: lower --long-tokens" in message
    for bad in (["--long-tokens", "0"], ["--shorts", "-1"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["demo", *bad])
        assert exit_info.value.code == 2


def test_demo_reports_a_profile_it_cannot_save_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import medha.perf

    def disk_full(profile: object, path: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(medha.perf, "save_profile", disk_full)
    argv = ["demo", "--model", "tiny-random", "--shorts", "1", "--policies", "lars"]
    message = _user_error(capsys, [*argv, "--out", str(tmp_path)])
    assert "cannot write" in message and "No space left on device" in message
