"""The pytest plugin: options, model fixtures, xdist grouping, result merging and the comparison table.

Hooks stay thin; the work lives in run/options.py, run/worker.py (worker side), run/controller.py (controller side:
every merge of worker results) and reports/results_dir.py (the files written).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from llmlab_fixtures.errors import LlmlabError
from llmlab_fixtures.eval.summary import TaskSummary, record_properties
from llmlab_fixtures.providers.base import SpeedProbeUnsupported
from llmlab_fixtures.reports.comparison import Report
from llmlab_fixtures.reports.cost import add_cost_options, cost_settings_from_pytest
from llmlab_fixtures.reports.results_dir import write_run
from llmlab_fixtures.reports.speed import XDIST_SKIP, SpeedFigure, measure, speed_property
from llmlab_fixtures.reports.table import privacy_note
from llmlab_fixtures.reports.terminal import terminal_report
from llmlab_fixtures.run.auto_workers import auto_workers_line
from llmlab_fixtures.run.availability import UnavailableModel, split_available
from llmlab_fixtures.run.controller import ResultCollector, merge_items, merge_unloads, remove_parts, summary_property
from llmlab_fixtures.run.network import NetworkGuard
from llmlab_fixtures.run.options import RunConfig, add_options, build_run_config
from llmlab_fixtures.run.worker import (
    BenchSession,
    LoadedModel,
    backend_settings,
    loglikelihood_sources,
    run_scoring,
)

RUN_CONFIG = pytest.StashKey[RunConfig]()
SESSION = pytest.StashKey[BenchSession]()
COLLECTOR = pytest.StashKey[ResultCollector]()
GUARD = pytest.StashKey[NetworkGuard]()
OUTPUT_DIR_INPUT = "llmlab_output_dir"
UNAVAILABLE_INPUT = "llmlab_unavailable"
BLOCKED_PROPERTY = "llmlab_blocked_connections"


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)
    add_cost_options(parser)


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def pytest_unconfigure(config: pytest.Config) -> None:
    if SESSION in config.stash:
        config.stash[SESSION].close()
    if GUARD in config.stash:
        config.stash[GUARD].uninstall()


def _dist_given(config: pytest.Config) -> bool:
    return any(a == "--dist" or a.startswith("--dist=") or a == "-d" for a in config.invocation_params.args)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "llmlab_dataset(name): a benchmark test that scores one dataset")
    if getattr(config.option, "numprocesses", None) and not _dist_given(config):
        config.option.dist = "loadgroup"  # pin each model to one worker: loaded at most once per run
    if getattr(config.option, "help", False):
        return
    workerinput = getattr(config, "workerinput", None)
    output_dir = workerinput.get(OUTPUT_DIR_INPUT) if workerinput else None
    try:
        run_config = build_run_config(config.option, Path(output_dir) if output_dir else None)
        run_config = dataclasses.replace(run_config, cost=cost_settings_from_pytest(config))
        if run_config.local_only:
            guard = NetworkGuard()
            guard.install()
            config.stash[GUARD] = guard
        run_config = _with_availability(run_config, workerinput)
    except LlmlabError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[RUN_CONFIG] = run_config
    config.stash[SESSION] = BenchSession(run_config, progress=_progress_writer(config))
    config.stash[COLLECTOR] = ResultCollector()
    if workerinput is None:
        config.pluginmanager.register(ControllerHooks(config), "llmlab-controller")


def _with_availability(run_config: RunConfig, workerinput: dict[str, Any] | None) -> RunConfig:
    """Drop models that cannot run here; the controller checks, xdist workers take its verdict."""
    if workerinput is not None:
        unavailable = [UnavailableModel.from_json(u) for u in json.loads(workerinput.get(UNAVAILABLE_INPUT, "[]"))]
    else:
        _, unavailable = split_available(run_config.models, backend_settings(run_config))
    if not unavailable:
        return run_config
    gone = {u.label for u in unavailable}
    models = tuple(m for m in run_config.models if m.label not in gone)
    if not models:
        raise LlmlabError("; ".join(u.reason for u in unavailable))
    return dataclasses.replace(run_config, models=models, unavailable=tuple(unavailable))


def _progress_writer(config: pytest.Config) -> Callable[[str], None] | None:
    if _is_worker(config):
        return None

    def write(line: str) -> None:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        capture = config.pluginmanager.get_plugin("capturemanager")
        if reporter is None or capture is None:
            return
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)

    return write


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist: every worker writes into the controller's results directory."""
    run_config = node.config.stash[RUN_CONFIG]
    node.workerinput[OUTPUT_DIR_INPUT] = str(run_config.output_dir)
    node.workerinput[UNAVAILABLE_INPUT] = json.dumps([u.to_json() for u in run_config.unavailable])


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """With ``--dist loadgroup`` (set by llmlab for ``-n``), schedule one work unit per model."""
    if config.getvalue("dist") != "loadgroup" or RUN_CONFIG not in config.stash:
        return None
    from llmlab_fixtures.run.scheduling import ModelScheduling

    return ModelScheduling(config, log, labels=[m.label for m in config.stash[RUN_CONFIG].models])


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    if RUN_CONFIG not in config.stash:
        return None
    run = config.stash[RUN_CONFIG]
    lines = [f"llmlab: models {', '.join(m.label for m in run.models)}; scoring {run_scoring(run)}; "
             f"data {run.data_dir or 'Hugging Face Hub'}; results {run.output_dir}"]
    lines += [f"llmlab: {notice}" for notice in run.notices]
    lines += [f"llmlab: {line}" for line in loglikelihood_sources(run)]
    if run.dropped_models:
        lines.append(f"llmlab: --local-only dropped {', '.join(run.dropped_models)}")
    if run.local_only:
        lines.append("llmlab: --local-only: connections to anything but loopback are refused for this run")
    lines += [f"llmlab: {u.line}" for u in run.unavailable]
    if auto := auto_workers_line(config):
        lines.append(auto)
    return lines


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``model_spec`` with the requested models, each pinned to one xdist worker."""
    if "model_spec" not in metafunc.fixturenames:
        return
    specs = metafunc.config.stash[RUN_CONFIG].models
    params = [pytest.param(s, id=s.label, marks=pytest.mark.xdist_group(s.label)) for s in specs]
    metafunc.parametrize("model_spec", params, scope="session")


@pytest.fixture(scope="session")
def llmlab_session(pytestconfig: pytest.Config) -> BenchSession:
    """This process's benchmark session (configuration, progress)."""
    return pytestconfig.stash[SESSION]


@pytest.fixture(scope="session")
def model(model_spec: Any, llmlab_session: BenchSession) -> Iterator[LoadedModel]:
    """The requested model, loaded once per worker and closed after its last test."""
    try:
        loaded = llmlab_session.load(model_spec)
    except LlmlabError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield loaded
    llmlab_session.unload(loaded)


@pytest.fixture
def run_task(model: LoadedModel, llmlab_session: BenchSession,
             record_property: Callable[[str, object], None]) -> Callable[[str], TaskSummary]:
    """Score one dataset on ``model``; records accuracy, latency and tokens with ``record_property``."""

    def run(task_name: str) -> TaskSummary:
        if reason := llmlab_session.unsupported_reason(task_name):
            pytest.skip(reason)
        try:
            summary = llmlab_session.run_task(task_name, model)
        except LlmlabError as exc:
            pytest.fail(str(exc), pytrace=False)
        for name, value in record_properties(summary):
            record_property(name, value)
        record_property(*summary_property(summary))
        return summary

    return run


@pytest.fixture
def measure_speed(model: LoadedModel, benchmark: Any,
                  record_property: Callable[[str, object], None]) -> Callable[[str], SpeedFigure]:
    """Time one llama-bench-style test (pp512, tg128, ttft) on ``model`` with pytest-benchmark and record it."""

    def run(test: str) -> SpeedFigure:
        if benchmark.disabled:
            pytest.skip(XDIST_SKIP)
        try:
            figure = measure(test, model.provider, model.spec.label, benchmark)
        except SpeedProbeUnsupported as exc:
            pytest.skip(str(exc))
        record_property(f"{test}_{figure.unit.replace('/', '_per_')}", round(figure.value, 4))
        record_property(*speed_property(figure))
        return figure

    return run


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Under --local-only, carry refused connections to the controller on the test's report."""
    outcome = yield
    guard = item.config.stash.get(GUARD, None)
    if guard is not None and (blocked := guard.take_blocked()):
        report = outcome.get_result()
        report.user_properties = [*report.user_properties, (BLOCKED_PROPERTY, json.dumps(blocked))]


class ControllerHooks:
    """Hooks that run only where results are merged: the xdist controller, or the single pytest process."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.run = config.stash[RUN_CONFIG]
        self.collector = config.stash[COLLECTOR]
        self.written: list[Path] = []
        self.summaries: list[TaskSummary] = []
        self.notes: list[str] = []
        self.blocked: set[str] = set()
        self.report: Report | None = None
        self._finished = False

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call":
            self.collector.add_report(report.user_properties)
        for key, value in report.user_properties:
            if key == BLOCKED_PROPERTY:
                self.blocked.update(json.loads(value))

    def _notes(self) -> list[str]:
        notes = list(self.run.notices) + [u.line for u in self.run.unavailable]
        guard = self.config.stash.get(GUARD, None)
        if guard is not None:
            self.blocked.update(guard.take_blocked())
        if self.run.local_only:
            notes.append(privacy_note(self.summaries, sorted(self.blocked)))
        return notes

    def finish_results(self) -> None:
        """Merge and write the results once (pytest-html may ask for the report before our sessionfinish)."""
        if self._finished:
            return
        self._finished = True
        self.summaries = summaries = self.collector.merged([m.label for m in self.run.models])
        merge_unloads(summaries, self.run.output_dir)
        self.notes = self._notes()
        if summaries or self.collector.speeds:
            items = merge_items(self.run.output_dir, summaries)
            self.written, self.report = write_run(
                self.run.output_dir, summaries, items, formats=self.run.export_formats,
                config=self.run.public_dict(), notes=self.notes, cost=self.run.cost, speeds=self.collector.speeds)
            remove_parts(self.run.output_dir)

    @pytest.hookimpl(optionalhook=True)
    def pytest_html_results_summary(self, prefix: list[str], summary: list[str], postfix: list[str],
                                    session: pytest.Session) -> None:
        """pytest-html (when installed): the comparison tables and plots in the report's summary."""
        self.finish_results()
        if self.report is not None:
            from llmlab_fixtures.reports.html_report import pytest_html_fragment

            postfix.append(pytest_html_fragment(self.report))

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self.finish_results()
        failed_models = any(not u.missing_key for u in self.run.unavailable)
        if (failed_models or self.blocked) and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        lines = (terminal_report(self.report, run_scoring(self.run)) if self.report is not None
                 else [f"note: {note}" for note in self.notes])
        for line in lines:
            if line.startswith(("== ", "-- ")):
                terminalreporter.write_sep(line[0], line[3:])
            else:
                terminalreporter.write_line(line)
        if self.written:
            terminalreporter.write_line(f"results: {', '.join(str(p) for p in self.written)}")
