"""`medha serve`'s command line: the EngineConfig it builds from --config and its options, and
the one-line errors of a config it cannot read or a missing serve extra."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from medha.cli import main, parse_args
from medha.commands.serve import engine_config


def test_options_override_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "engine.json"
    path.write_text(json.dumps({"policy": "edf", "num_blocks": 64, "dtype": "bfloat16"}))
    args = parse_args(["serve", "tiny-random", "--config", str(path), "--policy", "fcfs"])
    config = engine_config(args)
    assert (config.model, config.policy, config.num_blocks) == ("tiny-random", "fcfs", 64)
    assert config.dtype == "bfloat16"
    plain = engine_config(parse_args(["serve", "m", "--kv-cache-gib", "2", "--max-model-len", "9"]))
    assert (plain.policy, plain.kv_cache_gib, plain.max_model_len) == ("lars", 2.0, 9)
    assert plain.generation_config == "auto"
    vllm = engine_config(parse_args(["serve", "m", "--generation-config", "vllm"]))
    assert vllm.generation_config == "vllm"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read the config"),
        ("{not json", "cannot read the config"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"num_blocks": -1}', "num_blocks"),
        ('{"no_such_field": 1}', "no_such_field"),
    ],
)
def test_a_config_it_cannot_use_is_one_line_and_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    path = tmp_path / "engine.json"
    if content is not None:
        path.write_text(content)
    assert main(["serve", "tiny-random", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medha: error: ") and message in err and err.count("\n") == 1


def test_without_the_serve_extra_it_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn now raises ImportError
    assert main(["serve", "tiny-random"]) == 2
    assert "pip install 'medha[serve]'" in capsys.readouterr().err


@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_a_port_out_of_range_is_refused_before_the_model_loads(
    port: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(["serve", "tiny-random", "--port", port])
    assert exited.value.code == 2 and "a port is 0-65535" in capsys.readouterr().err


def test_the_api_key_comes_from_the_option_or_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert parse_args(["serve", "m"]).api_key is None
    monkeypatch.setenv("MEDHA_API_KEY", "from-env")
    assert parse_args(["serve", "m"]).api_key == "from-env"
    assert parse_args(["serve", "m", "--api-key", "given"]).api_key == "given"


def test_tool_call_options(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def not_reached(args: object) -> None:
        raise AssertionError("the command went on to build the engine")

    monkeypatch.setattr("medha.commands.serve.engine_config", not_reached)
    assert parse_args(["serve", "m", "--tool-call-parser", "hermes"]).tool_call_parser == "hermes"
    assert not parse_args(["serve", "m"]).enable_tokenizer_info_endpoint
    assert parse_args(
        ["serve", "m", "--enable-tokenizer-info-endpoint"]
    ).enable_tokenizer_info_endpoint
    assert not parse_args(["serve", "m"]).return_tokens_as_token_ids
    assert parse_args(["serve", "m"]).reasoning_parser is None
    # vLLM's, for what medha always does: taken, so that a vLLM command line runs as it is.
    assert parse_args(["serve", "m", "--enable-prompt-tokens-details"]).model == "m"
    assert parse_args(["serve", "m", "--reasoning-parser", "qwen3"]).reasoning_parser == "qwen3"
    with pytest.raises(SystemExit) as exited:
        parse_args(["serve", "m", "--tool-call-parser", "mistral"])
    assert exited.value.code == 2 and "invalid choice: 'mistral'" in capsys.readouterr().err
    # vLLM's --enable-auto-tool-choice is taken, with a parser, as vLLM needs it.
    assert main(["serve", "tiny-random", "--enable-auto-tool-choice"]) == 2
    assert "--enable-auto-tool-choice needs --tool-call-parser" in capsys.readouterr().err


def test_a_parser_the_model_defeats_is_one_line_and_status_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import medha.server

    def create_app(
        *args: object,
        tool_call_parser: str,
        enable_tokenizer_info: bool,
        return_tokens_as_token_ids: bool,
        reasoning_parser: str,
        **kwargs: object,
    ) -> None:
        assert tool_call_parser == "hermes" and enable_tokenizer_info
        assert return_tokens_as_token_ids and reasoning_parser == "deepseek_r1"
        assert kwargs["allowed_origins"] == ["*"]
        raise ValueError("the hermes parser looks for <tool_call> ... marks special")

    monkeypatch.setattr(medha.server, "create_app", create_app)
    code = main(
        [
            *("serve", "tiny-random", "--tool-call-parser", "hermes", "--port", "0"),
            *("--enable-tokenizer-info-endpoint", "--return-tokens-as-token-ids"),
            *("--reasoning-parser", "deepseek_r1", "--allowed-origins", '["*"]'),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("medha: error: the hermes parser") and err.count("\n") == 1


@pytest.mark.parametrize("host", ["127.0.0.1", "999.1.1.1"])
def test_a_port_in_use_or_a_foreign_host_is_one_line_and_status_2_before_the_model_loads(
    host: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    import medha.engine

    def no_engine(*args: object, **kwargs: object) -> None:
        raise AssertionError("started the engine before binding the port")

    monkeypatch.setattr(medha.engine, "Engine", no_engine)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", "tiny-random", "--host", host, "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"medha: error: cannot listen on {host}:{port}: ")
    assert err.count("\n") == 1


@pytest.mark.parametrize("host", ["", "localhost", "127.0.0.1"])
def test_the_server_listens_on_every_address_of_its_host_on_one_port(host: str) -> None:
    import socket

    from medha.commands.serve import listening_sockets

    sockets = listening_sockets(host, 0)
    try:
        ports = {sock.getsockname()[1] for sock in sockets}
        assert len(ports) == 1 and 0 not in ports
        families = {sock.family for sock in sockets}
        if host == "":  # every interface: IPv4's at least
            assert socket.AF_INET in families
        with socket.create_connection(("127.0.0.1", ports.pop()), timeout=5):
            pass  # something listens where the banner will say
    finally:
        for sock in sockets:
            sock.close()


def test_serve_freezes_what_start_up_made_once_the_engine_runs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Out of the collector's full passes, which walked every torch and model object on the
    event loop (~250 ms each). Called with the engine running: stopped there, to see it."""
    import medha.commands.serve as serve
    from medha.commands.user_errors import UsageError

    running: list[bool] = []

    def freeze() -> None:
        running.append(True)
        raise UsageError("stopped at the freeze")

    async def served(self: Any, sockets: object = None) -> None:  # ends at once if reached
        self.should_exit = True

    import uvicorn

    monkeypatch.setattr(serve, "freeze_startup_heap", freeze)
    monkeypatch.setattr(uvicorn.Server, "serve", served)
    assert main(["serve", "tiny-random", "--port", "0"]) == 2
    assert running and "stopped at the freeze" in capsys.readouterr().err


def test_the_freeze_leaves_the_heap_out_of_full_collections() -> None:
    import gc

    from medha.commands.serve import freeze_startup_heap

    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
