"""lm-evaluation-harness through `medha serve` against lm-evaluation-harness on transformers.

Runs two small tasks on 20 general-knowledge questions written here, twice on SmolLM2-135M in
float32: with lm-eval's `local-completions` model against `medha serve` (its `echo` +
`logprobs` completions, and the server's tokenizer through /tokenizer_info, /tokenize and
/detokenize), and with lm-eval's `hf` model on the same weights. The multiple-choice task makes
80 log-likelihood requests; the generation task 20 greedy generations (up to a newline, 24
tokens at most). Prints both accuracies, how far each log-likelihood and is-greedy flag differ,
and how many generations are the same.

lm-eval is not a medha dependency: install it in a virtual environment of its own and pass its
`lm_eval` command (nothing is downloaded: the task's data is a local JSON file).

    python3.11 -m venv /tmp/lme
    /tmp/lme/bin/pip install -c constraints.txt "lm_eval[api,hf]==0.4.13" torch==2.13.0
    .venv/bin/python benchmarks/lm_eval_parity.py --lm-eval /tmp/lme/bin/lm_eval
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QUESTIONS = [
    ("What is the capital of France?", ["Paris", "Berlin", "Madrid", "Rome"], 0),
    ("How many legs does a spider have?", ["six", "eight", "four", "ten"], 1),
    ("What color is the sky on a clear day?", ["green", "red", "blue", "yellow"], 2),
    ("Which planet is known as the Red Planet?", ["Venus", "Jupiter", "Saturn", "Mars"], 3),
    ("What do bees make?", ["honey", "milk", "silk", "wool"], 0),
    ("What is two plus two?", ["three", "four", "five", "six"], 1),
    ("Which animal barks?", ["cat", "cow", "dog", "fish"], 2),
    ("What is frozen water called?", ["steam", "sand", "glass", "ice"], 3),
    ("Which season comes after winter?", ["spring", "autumn", "summer", "night"], 0),
    ("What is the largest ocean on Earth?", ["Atlantic", "Pacific", "Indian", "Arctic"], 1),
    ("What gas do plants take in from the air?", ["oxygen", "helium", "carbon dioxide", "neon"], 2),
    ("How many days are in a week?", ["five", "six", "eight", "seven"], 3),
    (
        "Who wrote Romeo and Juliet?",
        ["William Shakespeare", "Charles Dickens", "Jane Austen", "Mark Twain"],
        0,
    ),
    (
        "What is the boiling point of water in Celsius?",
        ["50 degrees", "100 degrees", "0 degrees", "200 degrees"],
        1,
    ),
    ("Which organ pumps blood through the body?", ["lungs", "liver", "heart", "brain"], 2),
    ("What is the opposite of hot?", ["warm", "wet", "loud", "cold"], 3),
    ("What is the chemical symbol for gold?", ["Au", "Ag", "Fe", "Gd"], 0),
    ("How many continents are there?", ["five", "seven", "nine", "three"], 1),
    ("Which language is spoken in Brazil?", ["Spanish", "French", "Portuguese", "English"], 2),
    ("What shape has three sides?", ["square", "circle", "pentagon", "triangle"], 3),
]

TASK = """task: medha_parity
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""

GENERATION_TASK = """task: medha_generation
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n", "Question:"]
  max_gen_toks: 24
  do_sample: false
metric_list:
  - metric: exact_match
"""

PORT = 8011
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lm-eval", required=True, help="the lm_eval command to run")
    args = parser.parse_args()
    from medha.model.presets import materialize_preset

    folder = materialize_preset("smollm2-135m")
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        data = work / "data.jsonl"
        data.write_text(
            "".join(
                json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                for q, c, a in QUESTIONS
            )
        )
        (work / "medha_parity.yaml").write_text(TASK.format(data=data))
        (work / "medha_generation.yaml").write_text(GENERATION_TASK.format(data=data))
        served = _lm_eval_through_medha(args.lm_eval, work)
        reference = _lm_eval(
            args.lm_eval,
            work,
            "hf",
            f"pretrained={folder},dtype=float32",
            ["--device", "cpu"],
        )
    _report(served, reference)
    return 0


@dataclass(frozen=True)
class Run:
    """What one lm-eval model made of the two tasks."""

    metrics: dict[str, float]
    """The multiple-choice task's."""
    scores: dict[tuple[int, int], tuple[float, bool]]
    """(log-likelihood, is-greedy) by (question, choice)."""
    generations: dict[int, str]
    """The generation by question."""


def _lm_eval_through_medha(command: str, work: Path) -> Run:
    medha = Path(sys.executable).with_name("medha")
    server = subprocess.Popen(
        [
            *(str(medha), "serve", "smollm2-135m", "--port", str(PORT), "--dtype", "float32"),
            "--enable-tokenizer-info-endpoint",
        ],
        env={**os.environ, **OFFLINE},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(f"http://127.0.0.1:{PORT}/health")
        model_args = (
            f"base_url=http://127.0.0.1:{PORT}/v1/completions,model=smollm2-135m,"
            "num_concurrent=2,tokenizer_backend=remote,max_retries=1"
        )
        return _lm_eval(command, work, "local-completions", model_args, [])
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait_for(url: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"medha serve did not answer {url}")


def _lm_eval(command: str, work: Path, model: str, model_args: str, more: list[str]) -> Run:
    out = work / f"out-{model}"
    subprocess.run(
        [
            *(command, "--model", model, "--model_args", model_args, *more),
            *("--tasks", "medha_parity,medha_generation", "--include_path", str(work)),
            *("--log_samples", "--output_path", str(out)),
        ],
        env={**os.environ, **OFFLINE},
        check=True,
        capture_output=True,
    )
    (results,) = out.rglob("results_*.json")
    metrics = json.loads(results.read_text())["results"]["medha_parity"]
    scores = {
        (row["doc_id"], choice): (float(resp[0][0]), str(resp[0][1]) == "True")
        for row in _samples(out, "medha_parity")
        for choice, resp in enumerate(row["resps"])
    }
    generations = {
        row["doc_id"]: str(row["resps"][0][0]) for row in _samples(out, "medha_generation")
    }
    return Run(metrics, scores, generations)


def _samples(out: Path, task: str) -> list[dict[str, Any]]:
    (samples,) = out.rglob(f"samples_{task}_*.jsonl")
    return [json.loads(line) for line in samples.read_text().splitlines()]


def _report(served: Run, reference: Run) -> None:
    print(f"{'lm-eval model':34} {'acc':>6} {'acc_norm':>9}")
    for name, run in [
        ("local-completions -> medha serve", served),
        ("hf (transformers)", reference),
    ]:
        print(f"{name:34} {run.metrics['acc,none']:6.2f} {run.metrics['acc_norm,none']:9.2f}")
    assert served.scores.keys() == reference.scores.keys()
    keys = reference.scores
    gaps = [abs(served.scores[k][0] - reference.scores[k][0]) for k in keys]
    same_greedy = sum(served.scores[k][1] == reference.scores[k][1] for k in keys)
    print(
        f"{len(gaps)} log-likelihood requests: max |difference| {max(gaps):.2e}, "
        f"mean {sum(gaps) / len(gaps):.2e}; is-greedy the same in {same_greedy}/{len(gaps)}"
    )
    assert served.generations.keys() == reference.generations.keys()
    same = sum(served.generations[k] == reference.generations[k] for k in reference.generations)
    print(f"{len(reference.generations)} greedy generations: {same} the same")


if __name__ == "__main__":
    sys.exit(main())
