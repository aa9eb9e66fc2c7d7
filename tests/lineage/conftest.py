"""Helpers of the lineage tests: running `kedit` in a child process (its command line, environment and a
non-blocking reader of its stderr) and committing edit batches one on top of the other."""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAIN = "import sys; from kedit.cli import main; sys.exit(main(sys.argv[1:]))"  # what the `kedit` script runs


@pytest.fixture(scope="session")
def kedit_main() -> str:
    """``python -c`` code that runs `kedit` as the installed script does."""
    return MAIN


def _kedit_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
    return {**env, **extra}


@pytest.fixture(scope="session")
def kedit_env():
    """``kedit_env(**extra) -> env``: this environment for a `kedit` child (this checkout's sources first,
    no MLFLOW_TRACKING_URI), plus ``extra``."""
    return _kedit_env


class _Lines:
    """stderr of a child process, line by line, without blocking the test forever."""

    def __init__(self, stream) -> None:
        self.q: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=lambda: [self.q.put(line) for line in stream], daemon=True).start()

    def wait_for(self, text: str, timeout: float) -> bool:
        import time

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                line = self.q.get(timeout=max(0.1, end - time.monotonic()))
            except queue.Empty:
                break
            self.seen.append(line)
            if text in line:
                return True
        return False


@pytest.fixture(scope="session")
def line_reader():
    """``line_reader(stream)``: ``.wait_for(text, timeout) -> bool`` and ``.seen`` (lines read so far)."""
    return _Lines


def _feed(i: int, reqs) -> dict:
    return {"file_sha256": f"feed{i}", "path": f"feeds/day{i}.jsonl", "row_ids": [r.id for r in reqs],
            "facts": [{"id": r.id, "prompt": r.prompt, "subject": r.subject, "target_new": r.target_new,
                       "target_true": r.target_true} for r in reqs]}


def _commit_batches(store, lm, compute, batches):
    """Commit each batch on top of the last (the editor attached as the pipeline has it)."""
    from kedit.editors.registry import attach_state

    parent, es, states = None, None, []
    for i, reqs in enumerate(batches):
        res = compute(lm, reqs, es)
        s = store.commit(lm, res, parent=parent, feed=_feed(i, reqs), hparams={"method": res.state.method})
        attach_state(lm, res.state)
        parent, es = s.id, res.state
        states.append(s)
    return states


@pytest.fixture(scope="session")
def commit_batches():
    """``commit_batches(store, lm, compute, batches) -> [EditState]``: ``compute(lm, reqs, prev_state)`` per
    batch, each committed as the child of the last with its facts in the feed, its state attached."""
    return _commit_batches


def _edited_hashes(lm, names) -> dict[str, str]:
    from kedit.atomic import sha256_tensor

    params = dict(lm.model.named_parameters())
    return {n: sha256_tensor(params[n]) for n in names}


@pytest.fixture(scope="session")
def edited_hashes():
    """``edited_hashes(lm, names) -> {name: sha256}`` of the model's parameters ``names``."""
    return _edited_hashes


ANSWER_PROMPTS = ["The Eiffel Tower is located in", "Rome is the capital of", "Danielle Darrieux speaks"]


@pytest.fixture(scope="session")
def answer_prompts() -> list[str]:
    """Prompts whose greedy answers tell edited states apart (``greedy_answers``, ``commit_states``)."""
    return ANSWER_PROMPTS


def _greedy(lm, prompts, k=6):
    from kedit.evaluation.metrics import greedy_tokens

    return [lm.tokenizer.decode(t, skip_special_tokens=True) for t in greedy_tokens(lm, prompts, k=k).tolist()]


@pytest.fixture(scope="session")
def greedy_answers():
    """``greedy_answers(lm, prompts, k=6) -> [str]``: ``k`` greedy tokens per prompt, decoded."""
    return _greedy


@pytest.fixture(scope="session")
def commit_states(fabricate):
    """``commit_states(store, lm, n)``: ``n`` chained states with strong fabricated deltas (so the greedy
    answers move) and fact records."""
    from kedit.editors.base import apply_deltas

    def commit(store, lm, n):
        states, parent, prev = [], None, None
        for i in range(n):
            res = fabricate(lm, prev, seed=i, rows=[f"r{i}"], layers=(1, 2, 3))
            res.deltas = {k: 400 * v for k, v in res.deltas.items()}
            apply_deltas(lm.model, res.deltas)
            facts = [{"id": f"r{i}", "subject": "Rome", "prompt": "{} is the capital of", "target_new": f"X{i}",
                      "target_true": "Italy"}]
            s = store.commit(lm, res, parent=parent,
                             feed={"row_ids": [f"r{i}"], "facts": facts, "path": f"feeds/day{i}.jsonl",
                                   "file_sha256": f"f{i}"},
                             hparams={"method": "alphaedit"},
                             predictions=dict(zip(ANSWER_PROMPTS, _greedy(lm, ANSWER_PROMPTS))))
            states.append(s)
            parent, prev = s.id, res.state
        return states

    return commit


def _forge(store, name: str, raw: dict) -> Path:
    import json

    store.events_dir.mkdir(parents=True, exist_ok=True)
    path = store.events_dir / name
    path.write_text(json.dumps(raw))
    return path


@pytest.fixture(scope="session")
def forge_event():
    """``forge_event(store, name, raw) -> Path``: ``raw`` written as the event file ``name``, bypassing the store."""
    return _forge
