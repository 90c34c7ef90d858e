"""Training recipes: one YAML file per run, validated before any work starts.

A recipe names the model, the data, the adapter and the optimisation; the DeepSpeed JSON it points
to holds only the ZeRO/offload/communication settings (batch sizes, precision and the optimizer
are filled in from the recipe so the two can never disagree). Every key is checked: an unknown
key, a missing file or a batch size that does not divide is a :class:`RecipeError` naming the
value and what would be valid.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import LLAMA_LINEARS, RaSAConfig

METHODS = ("rasa", "lora", "full")
DATA_MODES = ("pretrain", "sft")
PRECISIONS = ("bf16", "fp32")
ENGINES = ("deepspeed", "megatron")
MEGATRON_ATTENTIONS = ("sdpa", "local")


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the bad key/value and what would be valid."""


@dataclass
class ModelSection:
    """``path``: a local HF checkpoint dir (weights + config), loaded when given. ``config``: an
    architecture JSON, used by the dry run and for random init when there is no ``path``.
    ``tokenizer`` defaults to ``path``."""

    path: str | None = None
    config: str | None = None
    tokenizer: str | None = None
    gguf_file: str | None = None


@dataclass
class DataSection:
    """``mode=pretrain``: packed causal-LM blocks of ``seq_len`` tokens from ``text_field``.
    ``mode=sft``: Alpaca-style prompt (``instruction_field`` [+ ``input_field``]) and response
    (``response_field``), loss on the response only, truncated to ``seq_len``."""

    mode: str = "sft"
    paths: list[str] = field(default_factory=list)
    seq_len: int = 4096
    text_field: str = "text"
    instruction_field: str = "instruction"
    input_field: str = "input"
    response_field: str = "output"
    group_by_length: bool = True
    num_proc: int | None = None


@dataclass
class AdapterSection:
    """``method``: rasa | lora (RaSA with k=0) | full. Paper defaults: r=16, alpha 8 (math) / 32 (code).
    ``target_parameters``: stacked MoE expert weights (e.g. ``mlp.experts.gate_up_proj``), see RaSAConfig."""

    method: str = "rasa"
    r: int = 16
    k: int | None = None
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_LINEARS))
    target_parameters: list[str] = field(default_factory=list)


@dataclass
class TrainSection:
    """Paper (Appendix C / authors' scripts): LionW, lr 5e-4, betas (0.9, 0.95), weight decay 0,
    global batch 192, 8 epochs, cosine schedule with 10% warm-up, bf16, gradient checkpointing."""

    global_batch_size: int = 192
    micro_batch_size: int = 1
    epochs: float = 8.0
    max_steps: int | None = None
    lr: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    precision: str = "bf16"
    gradient_checkpointing: bool = True
    seed: int = 42
    optimizer: str = "lion"


@dataclass
class OutputSection:
    """``dir``: run directory (metrics.csv, checkpoints/, adapter/, peft_adapter/). ``save_every``: a
    checkpoint every N optimizer steps; ``keep_last``: keep the N newest (pruned only after a new one is
    verified; None keeps all). ``stop_signals``: signals on which every rank finishes its step, the run
    checkpoints and exits with status 99 (SLURM's time-limit / preemption warnings); ``max_minutes``: the
    same after this much wall time (Megatron-LM's ``--exit-duration-in-mins``). ``save_format``
    (``engine: megatron``): ``native`` (per-rank shards, resumed on the layout that wrote them) or
    ``torch_dist`` (a Megatron distributed checkpoint of the adapter and the optimizer state, resumed on
    any TP x PP x VPP x DP layout by dist-checkpoint resharding)."""

    dir: str = "runs/pretrain_rasa"
    save_every: int | None = None
    keep_last: int | None = None
    log_every: int = 1
    save_adapter: bool = True
    export_peft: bool = True
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    max_minutes: float | None = None
    save_format: str = "native"


SAVE_FORMATS = ("native", "torch_dist")


@dataclass
class MegatronSection:
    """Parallel layout for ``engine: megatron`` (data parallel = world / (tensor x pipeline)). Expert
    parallelism (MoE) splits the experts over ``expert_model_parallel_size`` of the data-parallel ranks.
    ``use_distributed_optimizer``: Megatron's distributed optimizer (AdamW states and the step sharded
    over data-parallel ranks) instead of a replicated torch optimizer; needs ``train.optimizer: adamw``.
    ``attention``: ``sdpa`` (torch's scaled_dot_product_attention: flash / memory-efficient kernels, no
    ``s^2`` score tensors) or ``local`` (Megatron's unfused ``DotProductAttention``).
    ``pretrained_checkpoint``: a Megatron distributed checkpoint (``torch_dist``: ``rasa-convert
    hf-to-megatron``, Megatron-LM; a Megatron-LM save root stands for the iteration its
    ``latest_checkpointed_iteration.txt`` names) whose base weights, and RaSA adapter when it holds one, initialise the
    model instead of ``model.path``'s safetensors (Megatron-LM's ``--pretrained-checkpoint``); the
    architecture and tokenizer still come from ``model.path`` / ``model.config``."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    attention: str = "sdpa"
    pretrained_checkpoint: str | None = None


@dataclass
class Recipe:
    engine: str = "deepspeed"
    deepspeed: str | None = None
    megatron: MegatronSection = field(default_factory=MegatronSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    train: TrainSection = field(default_factory=TrainSection)
    output: OutputSection = field(default_factory=OutputSection)

    def rasa_config(self) -> RaSAConfig | None:
        """The adapter's :class:`RaSAConfig` (``k=0`` for LoRA), or None for full fine-tuning."""
        a = self.adapter
        if a.method == "full":
            return None
        k = 0 if a.method == "lora" else a.k
        return RaSAConfig(r=a.r, k=k, alpha=a.alpha, dropout=a.dropout, target_modules=tuple(a.target_modules),
                          target_parameters=tuple(a.target_parameters))

    def data_parallel_size(self, world_size: int) -> int:
        """Data-parallel ranks of a launch on ``world_size`` GPUs: all of them for DeepSpeed, the world
        over tensor x pipeline parallel for Megatron."""
        if self.engine == "megatron":
            return world_size // (self.megatron.tensor_model_parallel_size * self.megatron.pipeline_model_parallel_size)
        return world_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {"model": ModelSection, "data": DataSection, "adapter": AdapterSection, "train": TrainSection,
             "output": OutputSection, "megatron": MegatronSection}


def _build_section(name: str, cls, values, where: str):
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise RecipeError(f"{where}: section {name!r} must be a mapping, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {[f'{name}.{u}' for u in unknown]}; "
                          f"valid keys of {name!r} are {sorted(known)}")
    values = dict(values)
    for key in _FLOAT_KEYS.get(name, ()):
        if key in values:
            values[key] = _as_float(values[key], f"{name}.{key}", where)
    if name == "train" and isinstance(values.get("betas"), (list, tuple)):
        values["betas"] = [_as_float(b, "train.betas", where) for b in values["betas"]]
    return cls(**values)


# YAML 1.1 reads ``3e-4`` (no dot) as a string; accept it as the number the user meant
_FLOAT_KEYS = {"train": ("lr", "weight_decay", "warmup_ratio", "max_grad_norm", "epochs"),
               "adapter": ("alpha", "dropout"), "output": ("max_minutes",)}


def _as_float(value, key: str, where: str):
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise RecipeError(f"{where}: {key} must be a number, got {value!r}") from None


def recipe_from_dict(data: dict, where: str = "recipe", base_dir: str | os.PathLike | None = None) -> Recipe:
    """Build a :class:`Recipe` from a parsed YAML mapping; relative paths resolve against ``base_dir``."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe must be a mapping of sections, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RecipeError(f"{where}: unknown top-level key(s) {unknown}; valid keys are {sorted(known)}")
    kwargs = {name: _build_section(name, cls, data.get(name), where) for name, cls in _SECTIONS.items()}
    recipe = Recipe(engine=data.get("engine", "deepspeed"), deepspeed=data.get("deepspeed"), **kwargs)
    if base_dir is not None:
        _resolve_paths(recipe, Path(base_dir))
    return recipe


def _resolve(path: str | None, base: Path) -> str | None:
    if path is None or os.path.isabs(path):
        return path
    candidate = base / path
    return str(candidate) if candidate.exists() or not Path(path).exists() else path


def _megatron_lm_iteration(path: str) -> str:
    """A Megatron-LM save root (``latest_checkpointed_iteration.txt``) -> the iteration directory it names
    now (``iter_0000500`` or ``release``), so a run and its resume name one checkpoint; else ``path``."""
    tracker = Path(path) / "latest_checkpointed_iteration.txt"
    if (Path(path) / "metadata.json").is_file() or not tracker.is_file():
        return path
    text = tracker.read_text().strip()
    if text != "release" and not text.isdigit():
        raise RecipeError(f"megatron.pretrained_checkpoint {path!r}: {tracker.name} holds {text!r}, not an "
                          "iteration number or 'release'")
    return str(Path(path) / ("release" if text == "release" else f"iter_{int(text):07d}"))


def _resolve_paths(recipe: Recipe, base: Path) -> None:
    recipe.deepspeed = _resolve(recipe.deepspeed, base)
    recipe.model.path = _resolve(recipe.model.path, base)
    recipe.model.config = _resolve(recipe.model.config, base)
    recipe.model.tokenizer = _resolve(recipe.model.tokenizer, base)
    recipe.megatron.pretrained_checkpoint = _resolve(recipe.megatron.pretrained_checkpoint, base)
    recipe.data.paths = [_resolve(p, base) for p in recipe.data.paths]


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply ``section.key=value`` overrides (YAML-parsed values), validate.

    Relative paths inside the file are taken relative to the file's directory first, then to the
    current directory.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from err
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"override {item!r} must look like section.key=value")
        target = data
        *parents, leaf = key.split(".")
        for name in parents:
            target = target.setdefault(name, {})
            if not isinstance(target, dict):
                raise RecipeError(f"override {item!r}: {name!r} is not a section")
        target[leaf] = yaml.safe_load(raw)
    return recipe_from_dict(data, where=str(path), base_dir=path.parent)


def validate_recipe(recipe: Recipe, world_size: int, require_data: bool = True) -> int:
    """Check a recipe against the launch; return the gradient-accumulation steps.

    Raises:
        RecipeError: naming the bad value and what would be valid.
    """
    if recipe.engine not in ENGINES:
        raise RecipeError(f"engine={recipe.engine!r} is not supported here; valid: {list(ENGINES)}")
    m = recipe.model
    if m.path is None and m.config is None:
        raise RecipeError("model: give model.path (a HF checkpoint dir with weights) and/or model.config "
                          "(an architecture config JSON: random init without a path, and the dry run)")
    if require_data and m.path is not None and not Path(m.path).exists():
        raise RecipeError(f"model.path {m.path!r} does not exist (set it with --set model.path=DIR, "
                          "or use --dry-run to plan without weights)")
    if m.config is not None and not Path(m.config).is_file():
        raise RecipeError(f"model.config {m.config!r} is not a file")
    if not require_data and m.config is None and not Path(m.path).exists():
        raise RecipeError(f"dry run needs model.config or an existing model.path; {m.path!r} does not exist")
    d = recipe.data
    if d.mode not in DATA_MODES:
        raise RecipeError(f"data.mode={d.mode!r}; valid: {list(DATA_MODES)}")
    if require_data:
        if not d.paths:
            raise RecipeError("data.paths is empty; give local .jsonl/.json/.parquet/.arrow/.txt files")
        missing = [p for p in d.paths if not Path(p).exists()]
        if missing:
            raise RecipeError(f"data path(s) not found: {missing}")
        if m.tokenizer is None and m.path is None:
            raise RecipeError("model.tokenizer is required when the model comes from model.config")
    if not isinstance(d.seq_len, int) or d.seq_len < 2:
        raise RecipeError(f"data.seq_len must be an integer >= 2, got {d.seq_len!r}")
    a = recipe.adapter
    if a.method not in METHODS:
        raise RecipeError(f"adapter.method={a.method!r}; valid: {list(METHODS)}")
    if a.method != "full":
        try:
            recipe.rasa_config()
        except ValueError as err:
            raise RecipeError(f"adapter: {err}") from err
    t = recipe.train
    if t.precision not in PRECISIONS:
        raise RecipeError(f"train.precision={t.precision!r}; valid: {list(PRECISIONS)}")
    if t.optimizer not in ("lion", "adamw"):
        raise RecipeError(f"train.optimizer={t.optimizer!r}; valid: ['lion', 'adamw']")
    for name in ("global_batch_size", "micro_batch_size"):
        value = getattr(t, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise RecipeError(f"train.{name} must be a positive integer, got {value!r}")
    data_parallel = world_size
    if recipe.engine == "megatron":
        data_parallel = _validate_megatron(recipe, world_size)
    per_step = t.micro_batch_size * data_parallel
    if t.global_batch_size % per_step:
        what = "world_size" if recipe.engine == "deepspeed" else "data-parallel size"
        raise RecipeError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size x {what} = "
            f"{t.micro_batch_size} x {data_parallel} = {per_step}; use a multiple of {per_step}")
    if t.max_steps is not None and (not isinstance(t.max_steps, int) or t.max_steps <= 0):
        raise RecipeError(f"train.max_steps must be a positive integer or null, got {t.max_steps!r}")
    if not t.epochs > 0:
        raise RecipeError(f"train.epochs must be positive, got {t.epochs!r}")
    if not t.lr > 0:
        raise RecipeError(f"train.lr must be positive, got {t.lr!r}")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        raise RecipeError(f"train.betas must be two numbers in [0, 1), got {t.betas!r}")
    if not 0 <= t.warmup_ratio < 1:
        raise RecipeError(f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio!r}")
    _validate_output(recipe.output)
    if recipe.output.save_format == "torch_dist" and recipe.engine != "megatron":
        raise RecipeError("output.save_format: torch_dist is the Megatron engine's (engine: megatron); "
                          f"engine: {recipe.engine} saves native checkpoints")
    if recipe.engine != "megatron" and recipe.megatron.pretrained_checkpoint is not None:
        raise RecipeError("megatron.pretrained_checkpoint is read by engine: megatron; with engine: "
                          f"{recipe.engine} give the HF checkpoint as model.path")
    if recipe.engine == "megatron":
        return t.global_batch_size // per_step
    if recipe.deepspeed is None:
        raise RecipeError("deepspeed: path to a DeepSpeed JSON (e.g. examples/configs/ds_zero3.json) is required")
    if not Path(recipe.deepspeed).is_file():
        raise RecipeError(f"deepspeed config {recipe.deepspeed!r} is not a file")
    try:
        json.loads(Path(recipe.deepspeed).read_text())
    except json.JSONDecodeError as err:
        raise RecipeError(f"deepspeed config {recipe.deepspeed!r} is not valid JSON: {err}") from err
    return t.global_batch_size // per_step


def _validate_output(o: OutputSection) -> None:
    from .control import signal_numbers

    for name in ("save_every", "keep_last"):
        value = getattr(o, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise RecipeError(f"output.{name} must be a positive integer or null, got {value!r}")
    if not isinstance(o.stop_signals, list):
        raise RecipeError(f"output.stop_signals must be a list of signal names, got {o.stop_signals!r}")
    try:
        signal_numbers(o.stop_signals)
    except ValueError as err:
        raise RecipeError(f"output.stop_signals: {err}") from err
    if o.max_minutes is not None and not (isinstance(o.max_minutes, (int, float)) and o.max_minutes > 0):
        raise RecipeError(f"output.max_minutes must be a positive number or null, got {o.max_minutes!r}")
    if o.save_format not in SAVE_FORMATS:
        raise RecipeError(f"output.save_format={o.save_format!r}; valid: {list(SAVE_FORMATS)}")


def _validate_megatron(recipe: Recipe, world_size: int) -> int:
    """Check the Megatron layout against the launch and the model; return the data-parallel size."""
    mg = recipe.megatron
    sizes = {"tensor_model_parallel_size": mg.tensor_model_parallel_size,
             "pipeline_model_parallel_size": mg.pipeline_model_parallel_size,
             "virtual_pipeline_model_parallel_size": mg.virtual_pipeline_model_parallel_size,
             "expert_model_parallel_size": mg.expert_model_parallel_size}
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RecipeError(f"megatron.{name} must be a positive integer, got {value!r}")
    model_parallel = mg.tensor_model_parallel_size * mg.pipeline_model_parallel_size
    if world_size % model_parallel:
        raise RecipeError(f"world size {world_size} is not divisible by tensor x pipeline parallel = "
                          f"{mg.tensor_model_parallel_size} x {mg.pipeline_model_parallel_size} = {model_parallel}")
    if (world_size // model_parallel) % mg.expert_model_parallel_size:
        raise RecipeError(f"data-parallel size {world_size // model_parallel} (world {world_size} / tensor x pipeline "
                          f"{model_parallel}) is not divisible by megatron.expert_model_parallel_size = "
                          f"{mg.expert_model_parallel_size}: the experts are split over data-parallel ranks")
    for name in ("sequence_parallel", "use_distributed_optimizer"):
        if not isinstance(getattr(mg, name), bool):
            raise RecipeError(f"megatron.{name} must be true or false, got {getattr(mg, name)!r}")
    if mg.attention not in MEGATRON_ATTENTIONS:
        raise RecipeError(f"megatron.attention={mg.attention!r}; valid: {list(MEGATRON_ATTENTIONS)}")
    if mg.use_distributed_optimizer and recipe.train.optimizer != "adamw":
        raise RecipeError(f"megatron.use_distributed_optimizer: true needs train.optimizer: adamw (Megatron's "
                          f"distributed optimizer is Adam/AdamW or SGD), got {recipe.train.optimizer!r}")
    if mg.pretrained_checkpoint is not None:
        mg.pretrained_checkpoint = _megatron_lm_iteration(mg.pretrained_checkpoint)
        if not (Path(mg.pretrained_checkpoint) / "metadata.json").is_file():
            raise RecipeError(f"megatron.pretrained_checkpoint {mg.pretrained_checkpoint!r} is not a Megatron "
                              "distributed checkpoint (a directory with metadata.json naming a sharded backend, "
                              "or a Megatron-LM save root whose latest_checkpointed_iteration.txt names one; "
                              "write one with rasa-convert hf-to-megatron)")
    if recipe.adapter.method == "full":
        raise RecipeError("engine: megatron trains adapters (adapter.method rasa or lora); use engine: deepspeed "
                          "for full fine-tuning")
    from transformers import AutoConfig

    from ..parallel_layout import check_parallel_sizes

    source = recipe.model.config or recipe.model.path
    if source is not None and Path(source).exists():
        hf_config = AutoConfig.from_pretrained(source)
        experts = getattr(hf_config, "num_local_experts", None) or 0
        if mg.expert_model_parallel_size > 1 and not experts:
            raise RecipeError(f"megatron.expert_model_parallel_size = {mg.expert_model_parallel_size} needs a MoE "
                              f"model; {source} has no experts (num_local_experts)")
        if experts and mg.tensor_model_parallel_size > 1 and not mg.sequence_parallel:
            raise RecipeError(f"a MoE model at megatron.tensor_model_parallel_size = {mg.tensor_model_parallel_size} "
                              "needs megatron.sequence_parallel: true (Megatron-core requires it for MoE with TP)")
        if experts % mg.expert_model_parallel_size:
            raise RecipeError(f"num_local_experts = {experts} is not divisible by megatron.expert_model_parallel_size"
                              f" = {mg.expert_model_parallel_size}")
        try:
            check_parallel_sizes(hf_config, mg.tensor_model_parallel_size,
                                 mg.pipeline_model_parallel_size, mg.virtual_pipeline_model_parallel_size)
        except ValueError as err:
            raise RecipeError(f"megatron: {err}") from err
    return recipe.data_parallel_size(world_size)
