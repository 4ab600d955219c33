"""What a run cost: local models (energy, hardware amortisation, optional VM rate) and cloud models (tokens × prices
from genai-prices or a configured price), plus the team lead's monthly cost of ownership and break-even.

Every setting remembers where it came from (default, pyproject.toml, pytest.ini or a CLI option) so the reports can
print each assumption next to the figure it made.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from llmlab_fixtures.errors import ConfigError
from llmlab_fixtures.providers import backend_named

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

HOURS_PER_MONTH = 730.0  # 8760 h / 12
JOULES_PER_KWH = 3.6e6
# genai-prices provider ids for llmlab's cloud backends (openai-compat: whoever serves the model name)


@dataclass(frozen=True)
class Setting:
    """One cost assumption: its key in [tool.llmlab] / results.json, its CLI option, default and meaning."""

    name: str
    option: str
    default: float | None
    unit: str
    help: str

    @property
    def ini(self) -> str:
        return f"llmlab_{self.name}"


SETTINGS = (
    Setting("electricity_usd_per_kwh", "--electricity-price", 0.15, "$/kWh",
            "electricity price (default 0.15, roughly a US household rate)"),
    Setting("cpu_watts", "--cpu-watts", 65.0, "W",
            "CPU draw when fully busy, for the CPU-time estimate used where RAPL is not readable (default 65)"),
    Setting("hardware_usd", "--hardware-price", 1500.0, "$", "purchase price of the machine (default 1500)"),
    Setting("hardware_lifetime_hours", "--hardware-lifetime-hours", 26280.0, "h",
            "hours the machine is written off over (default 26280 = 3 years around the clock)"),
    Setting("vm_usd_per_hour", "--vm-hourly-price", None, "$/h",
            "optional: hourly price of an equivalent cloud VM, shown as a time-based cost (default unset)"),
    Setting("monthly_tokens", "--monthly-tokens", 100_000_000.0, "tokens/month",
            "volume for --include-cost-analysis (default 100000000)"),
)
SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class ModelPrice:
    """A configured price in dollars per million tokens."""

    input_per_mtok: float
    output_per_mtok: float
    source: str


@dataclass
class CostSettings:
    """The cost assumptions of a run, each with where it came from."""

    values: dict[str, float | None] = field(default_factory=lambda: {s.name: s.default for s in SETTINGS})
    sources: dict[str, str] = field(default_factory=lambda: {s.name: "default" for s in SETTINGS})
    prices: dict[str, ModelPrice] = field(default_factory=dict)  # model label or alias -> configured price
    include_analysis: bool = False

    def __getattr__(self, name: str) -> Any:
        if name in SETTINGS_BY_NAME and "values" in self.__dict__:
            return self.values.get(name, SETTINGS_BY_NAME[name].default)
        raise AttributeError(name)

    def describe(self, name: str) -> str:
        """``0.15 $/kWh (default)``: a setting, its unit and its source."""
        value, setting = self.values.get(name), SETTINGS_BY_NAME[name]
        shown = "unset" if value is None else f"{value:,.10g} {setting.unit}"
        return f"{shown} ({self.sources.get(name, 'default')})"

    def to_json(self) -> dict[str, Any]:
        return {"values": dict(self.values), "sources": dict(self.sources), "include_analysis": self.include_analysis,
                "prices": {k: asdict(v) for k, v in self.prices.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> CostSettings:
        if not data:
            return cls()
        settings = cls(include_analysis=bool(data.get("include_analysis")))
        settings.values.update(data.get("values", {}))
        settings.sources.update(data.get("sources", {}))
        settings.prices = {k: ModelPrice(**v) for k, v in data.get("prices", {}).items()}
        return settings


def parse_number(name: str, value: Any, where: str) -> float:
    """A non-negative number (a positive one for the lifetime); ConfigError names where it came from."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {name} must be a number, got {value!r}") from None
    if number < 0 or (name == "hardware_lifetime_hours" and number == 0):
        raise ConfigError(f"{where}: {name} must be {'positive' if name == 'hardware_lifetime_hours' else '>= 0'}, "
                          f"got {value!r}")
    return number


def _toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}; fix the TOML syntax") from None


def parse_price(text: str, where: str) -> tuple[str, ModelPrice]:
    """``MODEL=IN/OUT`` (dollars per million input / output tokens), as given to --model-price."""
    model, sep, prices = text.partition("=")
    parts = prices.replace(",", "/").split("/")
    if not sep or not model.strip() or len(parts) != 2:
        raise ConfigError(f"{where} {text!r}: write MODEL=INPUT/OUTPUT in $ per million tokens, "
                          "e.g. --model-price openai-compat:smollm2=0.15/0.60")
    values = [parse_number("price", p, where) for p in parts]
    return model.strip(), ModelPrice(values[0], values[1], f"{where} {text}")


def _registry_prices(path: Path, table: Mapping[str, Any] | None) -> dict[str, ModelPrice]:
    prices = {}
    for alias, entry in (table or {}).items():
        price = entry.get("price") if isinstance(entry, dict) else None
        if price is None:
            continue
        where = f"{path.name} [models.{alias}].price"
        if not isinstance(price, dict) or not {"input_per_mtok", "output_per_mtok"} <= set(price):
            raise ConfigError(f"{where}: write price = {{input_per_mtok = 0.15, output_per_mtok = 0.6}}")
        prices[alias] = ModelPrice(parse_number("input_per_mtok", price["input_per_mtok"], where),
                                   parse_number("output_per_mtok", price["output_per_mtok"], where), where)
    return prices


def resolve_cost_settings(cli: Mapping[str, Any] | None = None, ini: Mapping[str, Any] | None = None,
                          pyproject: Path = Path("pyproject.toml"), llmlab_toml: Path = Path("llmlab.toml"),
                          cli_prices: Sequence[str] = (), include_analysis: bool = False) -> CostSettings:
    """Cost settings by precedence: CLI option > pytest.ini option > pyproject.toml [tool.llmlab] > default.

    Prices: ``price = {input_per_mtok, output_per_mtok}`` on a model in llmlab.toml ``[models.<alias>]`` or
    pyproject ``[tool.llmlab.models.<alias>]``, overridden by ``--model-price MODEL=IN/OUT``.
    """
    settings = CostSettings(include_analysis=include_analysis)
    project = _toml(pyproject).get("tool", {}).get("llmlab", {})
    layers = [(project, f"{pyproject.name} [tool.llmlab]"), (ini or {}, "ini option"), (cli or {}, None)]
    for values, where in layers:
        for s in SETTINGS:
            value = values.get(s.name)
            if value is None or value == "":
                continue
            label = where or s.option
            if where == "ini option":
                label = f"ini {s.ini}"
            settings.values[s.name] = parse_number(s.name, value, label)
            settings.sources[s.name] = label
    settings.prices.update(_registry_prices(pyproject, project.get("models")))
    settings.prices.update(_registry_prices(llmlab_toml, _toml(llmlab_toml).get("models")))
    settings.prices.update(dict(parse_price(text, "--model-price") for text in cli_prices))
    return settings


def add_cost_options(parser: Any) -> None:
    """The cost options, for pytest (parser.getgroup) and their ini twins."""
    group = parser.getgroup("llmlab-cost", "llmlab cost report options (also [tool.llmlab] in pyproject.toml)")
    for s in SETTINGS:
        group.addoption(s.option, dest=f"llmlab_{s.name}", default=None, help=s.help)
        parser.addini(s.ini, help=f"{s.help} [{s.unit}]", default=None)
    group.addoption("--model-price", dest="llmlab_model_price", action="append", default=[],
                    help="MODEL=IN/OUT: $ per million input/output tokens for a model (repeatable); overrides "
                         "genai-prices and price = {...} in the model registry")
    group.addoption("--include-cost-analysis", action="store_true", dest="llmlab_include_cost_analysis",
                    help="add total cost of ownership: monthly cost of each local vs cloud model at "
                         "--monthly-tokens, break-even volume and hardware payback")


def cost_settings_from_pytest(config: Any) -> CostSettings:
    """Resolve the cost settings from a pytest Config (CLI options, ini options, pyproject.toml)."""
    cli = {s.name: config.getoption(f"llmlab_{s.name}", None) for s in SETTINGS}
    ini = {s.name: config.getini(s.ini) for s in SETTINGS}
    return resolve_cost_settings(cli, ini, cli_prices=config.getoption("llmlab_model_price", None) or (),
                                 include_analysis=bool(config.getoption("llmlab_include_cost_analysis", False)))


def genai_prices_version() -> str | None:
    try:
        return metadata.version("genai-prices")
    except metadata.PackageNotFoundError:
        return None


@dataclass
class TaskCost:
    """What one model cost on one dataset (or on all of them: dataset ``(all)``)."""

    model: str
    dataset: str
    kind: str  # "local" or "cloud"
    n_items: int
    tokens: int  # prompt + completion tokens
    cost_usd: float | None
    note: str  # how the figure was made, or why it is n/a
    energy_j: float | None = None
    energy_usd: float | None = None
    hardware_usd: float | None = None
    vm_usd: float | None = None  # time-based alternative: the VM's hourly price × wall time
    wall_s: float = 0.0
    energy_meter: str | None = None  # which meters measured the energy: RAPL, NVML, CPU-time estimate

    @property
    def per_1k_tokens(self) -> float | None:
        return None if self.cost_usd is None or not self.tokens else self.cost_usd / self.tokens * 1000

    @property
    def per_1k_items(self) -> float | None:
        return None if self.cost_usd is None or not self.n_items else self.cost_usd / self.n_items * 1000

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "per_1k_tokens": self.per_1k_tokens, "per_1k_items": self.per_1k_items}


def is_cloud(backend: str) -> bool:
    """A hosted API, billed by tokens."""
    found = backend_named(backend)
    return found is not None and found.hosted


def configured_price(model: str, api_model: str | None, prices: Mapping[str, ModelPrice]) -> ModelPrice | None:
    """A configured price by model label, its short name (after ``backend:``) or its API model name."""
    short = model.split(":", 1)[1] if ":" in model else model
    for key in (model, short, api_model):
        if key and key in prices:
            return prices[key]
    return None


def _genai_price(items: Sequence[Mapping[str, Any]], backend: str, api_model: str) -> tuple[float | None, str]:
    """Sum of each request's price from genai-prices' bundled data; (None, why) when it has no price."""
    version = genai_prices_version()
    if version is None:
        return None, "n/a: genai-prices is not installed (pip install genai-prices) and no price is configured"
    from genai_prices import Usage, calc_price

    found = backend_named(backend)
    provider = found.price_provider if found else None
    total = 0.0
    found = None
    for item in items:
        usage = Usage(input_tokens=int(item.get("prompt_tokens") or 0),
                      output_tokens=int(item.get("completion_tokens") or 0))
        try:
            found = calc_price(usage, api_model, provider_id=provider)
        except LookupError:
            return None, (f"n/a: genai-prices {version} has no price for {api_model!r}"
                          f"{f' at {provider}' if provider else ''}; configure one (price = {{input_per_mtok, "
                          f"output_per_mtok}} in the model registry, or --model-price)")
        total += float(found.total_price)
    shown = f" ({found.provider.id} {found.model.id}: {found.model_price})" if found is not None else ""
    return total, f"tokens × genai-prices {version}{shown}"


def cloud_cost(model: str, dataset: str, backend: str, api_model: str, items: Sequence[Mapping[str, Any]],
               prices: Mapping[str, ModelPrice]) -> TaskCost:
    """Each request's token usage × its price; every item counts, errors included (a failed call may be billed)."""
    prompt = sum(int(i.get("prompt_tokens") or 0) for i in items)
    completion = sum(int(i.get("completion_tokens") or 0) for i in items)
    scored = sum(1 for i in items if i.get("error") is None)
    no_usage = sum(1 for i in items if i.get("error") is None and not i.get("prompt_tokens"))
    price = configured_price(model, api_model, prices)
    if no_usage:  # every prompt has tokens: a successful request with none means the server sent no usage
        cost, note = None, (f"n/a: the server reported no prompt-token usage for {no_usage} of {scored} requests "
                            "(llama-cpp-python's server sends none in streamed replies), so the input cost is unknown")
    elif price is not None:
        cost = (prompt * price.input_per_mtok + completion * price.output_per_mtok) / 1e6
        note = (f"tokens × ${price.input_per_mtok:g}/${price.output_per_mtok:g} per M input/output tokens "
                f"({price.source})")
    else:
        cost, note = _genai_price(items, backend, api_model)
    return TaskCost(model, dataset, "cloud", scored, prompt + completion, cost, note)


def meter_names(source: str | None) -> str | None:
    """The meters of an energy source without their figures: ``RAPL``, ``RAPL + NVML``, ``CPU-time estimate``."""
    if not source:
        return None
    pieces = source.split(" + ")
    names = ("CPU-time estimate" if piece.startswith("estimate") else piece.split(" ")[0] for piece in pieces)
    return " + ".join(dict.fromkeys(names))


def local_cost(model: str, dataset: str, *, n_items: int, tokens: int, wall_s: float, energy_j: float | None,
               energy_source: str | None, settings: CostSettings) -> TaskCost:
    """Energy × electricity price plus hardware amortisation for the wall time (and the VM rate, if set)."""
    hours = wall_s / 3600
    hardware = settings.hardware_usd / settings.hardware_lifetime_hours * hours
    vm = settings.vm_usd_per_hour * hours if settings.vm_usd_per_hour is not None else None
    if energy_j is None:
        return TaskCost(model, dataset, "local", n_items, tokens, None,
                        "n/a: this run recorded no energy (results made before llmlab measured it)",
                        hardware_usd=hardware, vm_usd=vm, wall_s=wall_s)
    energy = energy_j / JOULES_PER_KWH * settings.electricity_usd_per_kwh
    note = (f"energy {energy_j:.0f} J [{energy_source}] × {settings.describe('electricity_usd_per_kwh')} + "
            f"{settings.describe('hardware_usd')} ÷ {settings.describe('hardware_lifetime_hours')} × {wall_s:.1f} s")
    return TaskCost(model, dataset, "local", n_items, tokens, energy + hardware, note, energy_j=energy_j,
                    energy_usd=energy, hardware_usd=hardware, vm_usd=vm, wall_s=wall_s,
                    energy_meter=meter_names(energy_source))


def task_cost(summary: Any, items: Sequence[Mapping[str, Any]], settings: CostSettings) -> TaskCost:
    """The cost of one TaskSummary, from its energy figures (local) or its items' tokens (cloud)."""
    if is_cloud(summary.backend):
        api_model = (summary.model_info.get("extra") or {}).get("api_model") or summary.model.split(":", 1)[-1]
        cost = cloud_cost(summary.model, summary.dataset, summary.backend, api_model, items, settings.prices)
        cost.wall_s = summary.wall_s
        return cost
    return local_cost(summary.model, summary.dataset, n_items=summary.n_items,
                      tokens=summary.prompt_tokens + summary.completion_tokens, wall_s=summary.wall_s,
                      energy_j=summary.energy_j, energy_source=summary.energy_source, settings=settings)


def combine_costs(model: str, costs: Sequence[TaskCost], dataset: str = "(all)") -> TaskCost:
    """One model's costs over several datasets; n/a if any part is n/a."""
    missing = [c for c in costs if c.cost_usd is None]

    def total(attr: str) -> float | None:
        values = [getattr(c, attr) for c in costs]
        return None if any(v is None for v in values) else sum(values)

    note = missing[0].note if missing else f"sum of {len(costs)} datasets"
    meters = " + ".join(dict.fromkeys(c.energy_meter for c in costs if c.energy_meter)) or None
    return TaskCost(model, dataset, costs[0].kind, sum(c.n_items for c in costs), sum(c.tokens for c in costs),
                    None if missing else sum(c.cost_usd or 0.0 for c in costs), note, energy_j=total("energy_j"),
                    energy_usd=total("energy_usd"), hardware_usd=total("hardware_usd"), vm_usd=total("vm_usd"),
                    wall_s=sum(c.wall_s for c in costs), energy_meter=meters)


@dataclass
class OwnershipRow:
    """One local model against one cloud model at the configured monthly volume."""

    local_model: str
    cloud_model: str
    monthly_tokens: float
    machines: int  # machines needed to serve the volume at the measured speed
    local_monthly_usd: float
    local_energy_monthly_usd: float
    local_hardware_monthly_usd: float
    cloud_monthly_usd: float
    break_even_tokens: float | None  # monthly volume above which the local model is cheaper; None: never
    payback_months: float | None  # months until the hardware pays for itself at this volume; None: never
    note: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def ownership(local: TaskCost, cloud: TaskCost, settings: CostSettings) -> OwnershipRow | None:
    """Monthly cost of ``local`` vs ``cloud`` at settings.monthly_tokens, break-even volume and payback period.

    Local: energy per token (as measured) × volume, plus the hardware written off per month (one machine per
    730 h of work the volume needs at the measured tokens/s). Cloud: its blended price per token × volume.
    """
    if local.cost_usd is None or cloud.cost_usd is None or not local.tokens or not cloud.tokens or not local.wall_s:
        return None
    volume = settings.monthly_tokens
    energy_per_token = (local.energy_usd or 0.0) / local.tokens
    cloud_per_token = cloud.cost_usd / cloud.tokens
    tokens_per_s = local.tokens / local.wall_s
    capacity = tokens_per_s * 3600 * HOURS_PER_MONTH  # tokens one machine can do in a month
    machines = max(1, math.ceil(volume / capacity))
    hardware_month = settings.hardware_usd / (settings.hardware_lifetime_hours / HOURS_PER_MONTH)
    energy_monthly = energy_per_token * volume
    cloud_monthly = cloud_per_token * volume
    margin = cloud_per_token - energy_per_token
    break_even = hardware_month / margin if margin > 0 else None
    savings = cloud_monthly - energy_monthly
    payback = machines * settings.hardware_usd / savings if savings > 0 else None
    note = f"one machine does {capacity:.3g} tokens/month at {tokens_per_s:.1f} tokens/s"
    if break_even is not None and break_even > capacity:
        note += "; the break-even volume is beyond one machine's capacity"
    return OwnershipRow(local.model, cloud.model, volume, machines, energy_monthly + machines * hardware_month,
                        energy_monthly, machines * hardware_month, cloud_monthly, break_even, payback, note)


def ownership_table(costs: Iterable[TaskCost], settings: CostSettings) -> list[OwnershipRow]:
    """Every local model against every priced cloud model (overall costs)."""
    costs = list(costs)
    locals_ = [c for c in costs if c.kind == "local"]
    clouds = [c for c in costs if c.kind == "cloud"]
    return [row for lc in locals_ for cc in clouds if (row := ownership(lc, cc, settings)) is not None]
