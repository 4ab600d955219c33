"""Item checkpoints: committed as items finish, resumed on rerun, never mixed across settings; SIGKILL-proof."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import pytest

from llmlab_fixtures.eval.datasets import load_docs
from llmlab_fixtures.eval.evaluator import evaluate
from llmlab_fixtures.eval.records import ItemRecord
from llmlab_fixtures.models.gguf import SMOLLM2, embedded_gguf
from llmlab_fixtures.run.checkpoint import CheckpointStore, TaskCheckpoint, model_fingerprint
from llmlab_fixtures.tasks import get_task

# what an item cost this run, not what it scored: timings, and tokens actually evaluated (the prefix cache is cold
# after a restart, so the first item computed by each run evaluates a few more tokens)
RUN_COST_FIELDS = ("latency_s", "ttft_s", "evaluated_tokens")


def record(item_id: str, model: str = "m") -> ItemRecord:
    return ItemRecord(model=model, backend="llama-cpp", dataset="arc_easy", item_id=item_id, prediction=1, gold=1,
                      correct=True, metrics={"acc": 1.0}, loglikelihoods=[-1.5, -0.25], latency_s=0.1)


def test_store_keys_items_by_model_dataset_item_and_prompt(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "cp.sqlite")
    cache = TaskCheckpoint(store, "fp1", "arc_easy", model="llama-cpp:a", backend="llama-cpp")
    cache.save(record("7"), "digest-A")
    assert cache.lookup("7", "digest-B") is None  # other prompt or settings: not the same item
    assert TaskCheckpoint(store, "fp2", "arc_easy", model="x", backend="llama-cpp").lookup("7", "digest-A") is None
    again = TaskCheckpoint(CheckpointStore(tmp_path / "cp.sqlite"), "fp1", "arc_easy", model="llama-cpp:b",
                           backend="llama-cpp")
    found = again.lookup("7", "digest-A")
    assert found is not None and again.resumed == 1
    assert found.model == "llama-cpp:b" and found.loglikelihoods == [-1.5, -0.25]  # relabelled, values kept
    fresh = TaskCheckpoint(store, "fp1", "arc_easy", model="x", backend="llama-cpp", fresh=True)
    assert fresh.forgotten == 1 and store.count() == 0


def test_file_digest_is_cached_until_the_file_changes(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "cp.sqlite")
    weights = tmp_path / "m.gguf"
    weights.write_bytes(b"GGUF" + b"\0" * 100)
    first = store.file_sha256(weights)
    assert store.file_sha256(weights) == first
    weights.write_bytes(b"GGUF" + b"\1" * 100)
    os.utime(weights, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert store.file_sha256(weights) != first
    info = {"backend": "llama-cpp", "path": str(weights), "name": "llama-cpp:m", "extra": {}}
    assert model_fingerprint(store, info) != model_fingerprint(store, {**info, "backend": "transformers"})


def _write_many(path: str, prefix: str) -> None:
    cache = TaskCheckpoint(CheckpointStore(Path(path)), "fp", "arc_easy", model="m", backend="llama-cpp")
    for i in range(150):
        cache.save(record(f"{prefix}{i}"), "d")


def test_processes_write_one_file_concurrently(tmp_path: Path) -> None:
    path = str(tmp_path / "cp.sqlite")
    CheckpointStore(Path(path)).close()
    processes = [get_context("spawn").Process(target=_write_many, args=(path, p)) for p in ("a", "b", "c")]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
    assert [p.exitcode for p in processes] == [0, 0, 0]
    assert CheckpointStore(Path(path)).count() == 450


@pytest.fixture(scope="module")
def smollm():
    pytest.importorskip("llama_cpp")
    from llmlab_fixtures.providers.llama_cpp.provider import LlamaCppProvider

    with LlamaCppProvider(embedded_gguf(SMOLLM2), "llama-cpp:smollm2-135m", n_ctx=2048) as provider:
        yield provider


def test_a_rerun_takes_finished_items_from_the_checkpoint(smollm, data_dir: Path, tmp_path: Path) -> None:
    task = get_task("arc_easy")
    docs = load_docs(task, data_dir)[:6]
    store = CheckpointStore(tmp_path / "cp.sqlite")

    def run(scoring: str = "loglik", fresh: bool = False) -> tuple[list[dict], TaskCheckpoint]:
        cache = TaskCheckpoint(store, "fp", task.name, model="llama-cpp:smollm2-135m", backend="llama-cpp",
                               fresh=fresh)
        result = evaluate(task, smollm, docs, model_name="llama-cpp:smollm2-135m", fewshot_docs=None,
                          scoring=scoring, num_fewshot=None, cache=cache)
        return [i.to_json() for i in result.items], cache

    first, cache = run()
    assert cache.resumed == 0 and store.count() == 6
    second, cache = run()
    assert cache.resumed == 6 and second == first  # identical records, timings included: nothing recomputed
    _, cache = run(scoring="generate")  # other settings, other prompts: computed, not mixed in
    assert cache.resumed == 0 and store.count() == 12
    _, cache = run(fresh=True)
    assert cache.forgotten == 12 and cache.resumed == 0


# --- kill -9 at random points, resume, and compare with an uninterrupted run -----------------------------------

N_ITEMS = 40
KILLS = 22


def _bench_command(bench: Path, data_dir: Path, checkpoint: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "pytest", str(bench), "-k", "arc_easy", "--models=local:smollm2-135m",
            f"--limit={N_ITEMS}", f"--data-dir={data_dir}", f"--checkpoint={checkpoint}", f"--output-dir={out}",
            "--parallel-sequences=1",  # one item per llama.cpp call, so a checkpoint after every item
            "-p", "no:cacheprovider", "-q", "-p", "no:randomly"]


def _saved_items(checkpoint: Path) -> int:
    if not checkpoint.exists():
        return 0
    try:
        with sqlite3.connect(checkpoint, timeout=30) as db:
            return int(db.execute("SELECT COUNT(*) FROM items").fetchone()[0])
    except sqlite3.OperationalError:  # the table is being created
        return 0


def _comparable(path: Path) -> list[dict]:
    items = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in item.items() if k not in RUN_COST_FIELDS} for item in items]


def test_sigkill_at_random_points_then_resume_loses_and_duplicates_nothing(bench_pytester: pytest.Pytester,
                                                                          data_dir: Path, tmp_path: Path) -> None:
    bench = bench_pytester.path
    reference = tmp_path / "reference"
    done = subprocess.run(_bench_command(bench, data_dir, tmp_path / "ref.sqlite", reference), cwd=bench,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]

    checkpoint = tmp_path / "killed.sqlite"
    rng = random.Random(20261126)
    kill_log = []
    for attempt in range(KILLS):
        before = _saved_items(checkpoint)
        target = before + rng.choice([0, 0, 1, 1, 2, 3])  # 0: die while starting up / loading the model
        child = subprocess.Popen(_bench_command(bench, data_dir, checkpoint, tmp_path / f"killed-{attempt}"),
                                 cwd=bench, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
        deadline = time.monotonic() + 120
        while _saved_items(checkpoint) < target and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3))  # land anywhere: mid-item, mid-commit, mid-write of the part file
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        child.wait(30)
        kill_log.append((attempt, before, _saved_items(checkpoint), child.returncode))
    killed = [entry for entry in kill_log if entry[3] == -signal.SIGKILL]
    assert len(killed) >= 20, kill_log
    assert any(after == before for _, before, after, _ in killed), "no kill landed before an item finished"
    assert any(after > before for _, before, after, _ in killed), "no kill landed mid-run"
    print(f"\nkill points: {len(killed)}; saved items after each kill: {[e[2] for e in kill_log]}")

    final = tmp_path / "final"
    done = subprocess.run(_bench_command(bench, data_dir, checkpoint, final), cwd=bench, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    resumed_items, reference_items = _comparable(final / "items.jsonl"), _comparable(reference / "items.jsonl")
    ids = [i["item_id"] for i in resumed_items]
    assert len(ids) == N_ITEMS and len(set(ids)) == N_ITEMS  # nothing lost, nothing twice
    assert resumed_items == reference_items
    summaries = [json.loads((d / "results.json").read_text())["summary"][0] for d in (final, reference)]
    assert summaries[0]["metrics"] == summaries[1]["metrics"]
    assert summaries[0]["n_items"] == summaries[1]["n_items"] == N_ITEMS
    assert 0 < summaries[0]["n_resumed"] < N_ITEMS  # the final run resumed the killed runs' items, then finished
    assert f"{N_ITEMS}/{N_ITEMS} items ({summaries[0]['n_resumed']} from the checkpoint)" in done.stdout  # progress


def test_a_kill_in_the_middle_of_a_generation_batch_loses_only_replies_in_progress(
        bench_pytester: pytest.Pytester, data_dir: Path, tmp_path: Path) -> None:
    """GSM8K on four llama.cpp streams, all ten items in one generate_stream() call: replies are checkpointed as
    they end, so a SIGKILL while other streams are still generating keeps the finished ones, and the same command
    resumes to the results of an uninterrupted run."""
    bench = bench_pytester.path

    def command(checkpoint: Path, out: Path) -> list[str]:
        return [sys.executable, "-m", "pytest", str(bench), "-k", "gsm8k", "--models=local:smollm2-135m",
                "--limit=10", "--num-fewshot=1", "--parallel-sequences=4", f"--data-dir={data_dir}",
                f"--checkpoint={checkpoint}", f"--output-dir={out}", "-p", "no:cacheprovider", "-q"]

    reference = tmp_path / "reference"
    done = subprocess.run(command(tmp_path / "ref.sqlite", reference), cwd=bench, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:]
    checkpoint = tmp_path / "killed.sqlite"
    child = subprocess.Popen(command(checkpoint, tmp_path / "killed"), cwd=bench, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while _saved_items(checkpoint) < 2 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait(30)
    saved = _saved_items(checkpoint)
    assert child.returncode == -signal.SIGKILL and 2 <= saved < 10, (child.returncode, saved)

    final = tmp_path / "final"
    done = subprocess.run(command(checkpoint, final), cwd=bench, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:]
    resumed_items, reference_items = _comparable(final / "items.jsonl"), _comparable(reference / "items.jsonl")
    assert [i["item_id"] for i in resumed_items] == [i["item_id"] for i in reference_items]  # 0 lost, 0 twice
    assert resumed_items == reference_items
    summary = json.loads((final / "results.json").read_text())["summary"][0]
    assert summary["n_resumed"] == saved
    print(f"\nkilled with {saved}/10 replies checkpointed; resumed to the uninterrupted run's results")
