"""The experiment spec: pydantic models for spec v1 (``../shared/spec-v1.md``).

Only shape and single-section rules live here: types, ranges, enums and rules that
need nothing but the spec itself. Rules that need the resolved architecture or GPU
(``target_modules`` names, bf16 support) live in ``peftgen.resolve``. No I/O here.

Every model is frozen and forbids unknown keys: a misspelt key that were silently
ignored would surface as a wrong run an hour later, which is the failure this tool
exists to prevent.

Convention for rules that span fields (model validators): the message starts with the
field path relative to the model that raises it, then ``": "`` (e.g.
``"dataset.format: ..."`` on the spec, ``"distributed: ..."`` on ``hardware``), so the
loader can point at that field's line instead of the section's.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    field_validator,
    model_validator,
)

from peftgen.stack import (
    BUILTIN_REWARDS,
    INT8_SHARDING_REFUSED,
    LOCAL_DATA_LOADERS,
    MAX_VRAM_GIB,
    MIN_VRAM_GIB,
    OPTIMIZERS,
    vram_gib_problem,
)


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set the dotted spec key ``key`` (``training.max_length``) in a spec's raw mapping,
    making the sections it passes through (a section that is not a mapping is replaced)."""
    node = data
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[leaf] = value


def from_spec_dir(path: str, spec_dir: Path) -> Path:
    """``path`` as the spec means it: absolute, or relative to the spec's folder (``~`` is
    the home folder; ``~name`` of an unknown user stays a plain name), never the working
    directory."""
    try:
        expanded = Path(path).expanduser()
    except RuntimeError:
        expanded = Path(path)
    return Path(os.path.abspath(expanded if expanded.is_absolute() else spec_dir / expanded))


def is_local_dataset(dataset_path: str) -> bool:
    """A ``dataset.path`` naming a local file (``stack.LOCAL_DATA_LOADERS``), not a hub id."""
    return Path(dataset_path).suffix.lower() in LOCAL_DATA_LOADERS


SPEC_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"
# A Python identifier-like module name as peft matches it (a suffix of a dotted module path).
MODULE_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_0-9][A-Za-z0-9_]*)*$"
# "path/to/file.py:function" for a user reward function.
USER_REWARD_PATTERN = re.compile(r"^(?P<path>[^:\n\r\x00]+\.py):(?P<func>[A-Za-z_][A-Za-z0-9_]*)$")

Method = Literal["sft", "dpo", "grpo"]
Precision = Literal["auto", "bf16", "fp16", "8bit", "4bit"]
LoadPrecision = Literal["bf16", "fp16", "8bit", "4bit"]
"""How the base weights are loaded once ``auto`` is decided (the planner's candidates)."""
AttnImplementation = Literal["sdpa", "flash_attention_2", "eager"]
DatasetFormat = Literal["messages", "prompt_completion", "text", "preference", "prompt"]
Distributed = Literal["none", "ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3"]
PARAMETER_SHARDING_ENGINES: frozenset[Distributed] = frozenset({"fsdp", "deepspeed-zero3"})
"""Engines that shard the parameters themselves (FSDP FULL_SHARD, ZeRO-3)."""
STATE_SHARDING_ENGINES: frozenset[Distributed] = frozenset(
    {"fsdp", "deepspeed-zero2", "deepspeed-zero3"}
)
"""Engines that shard gradients and optimizer state (ZeRO-2 too)."""
# transformers 5.24 OptimizerNames that peftgen models and renders.
Optim = Literal[
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_8bit",
    "adamw_bnb_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
    "adafactor",
    "sgd",
    "lion_8bit",
    "lion_32bit",
    "paged_lion_8bit",
    "paged_lion_32bit",
]
SchedulerName = Literal[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
]
# "best" is left out: it needs a metric to track, which peftgen does not configure.
SaveStrategy = Literal["no", "steps", "epoch"]
ReportTo = Literal["none", "tensorboard", "wandb", "mlflow", "trackio"]
# trl 1.16 DPOConfig.loss_type values.
DpoLossType = Literal[
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
]
ChatTemplateName = Literal["chatml"]
LossOn = Literal["assistant", "completion", "all"]
Finetuning = Literal["lora", "full"]
"""What is trained: LoRA adapters on a frozen base, or every weight of the model."""
VllmMode = Literal[False, "colocate", "server"]
"""GRPO generation: ``model.generate`` (false), or trl's vLLM integration in the training
process (``colocate``) or on a separate server (``server``, ``trl vllm-serve``)."""

# The tokens SFT trains on when `training.loss_on` is not set, by dataset format: what a
# chat or instruction tune means (trl's own default for `messages` is every token).
DEFAULT_LOSS_ON: dict[str, LossOn] = {
    "messages": "assistant",
    "prompt_completion": "completion",
    "text": "all",
}
# The `loss_on` values each SFT format can honour.
LOSS_ON_BY_FORMAT: dict[str, tuple[LossOn, ...]] = {
    "messages": ("assistant", "all"),
    "prompt_completion": ("completion", "all"),
    "text": ("all",),
}

# Which dataset formats each method can train on.
FORMATS_BY_METHOD: dict[str, tuple[str, ...]] = {
    "sft": ("messages", "prompt_completion", "text"),
    "dpo": ("preference",),
    "grpo": ("prompt", "messages"),
}


def _refuse_bool(value: Any) -> Any:
    """``r: true`` would pass as 1: pydantic's lax mode reads a bool as a number, never
    the number a user meant."""
    if isinstance(value, bool):
        raise ValueError(f"must be a number, not {str(value).lower()}")
    return value


NOT_A_BOOL = BeforeValidator(_refuse_bool)
"""In every number field's ``Annotated``: true/false is refused, not read as 1/0."""


class _Frozen(BaseModel):
    """Base of every spec model: immutable, unknown keys are errors, docs become schema."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        use_attribute_docstrings=True,
        validate_default=True,
        # `.inf` / `.nan` are valid YAML floats but never a sensible setting; an unbounded
        # field such as lora_alpha would otherwise accept them.
        allow_inf_nan=False,
    )


class ModelSpec(_Frozen):
    """The base model to fine-tune."""

    id: Annotated[str, Field(min_length=1, max_length=300)]
    """Catalogue id or alias (e.g. `meta-llama/Meta-Llama-3-8B`, `llama3-8b`), a hub id, or a local
    folder with config.json."""
    revision: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    """Hub revision (branch, tag or commit) to load; `null` for the default branch."""
    trust_remote_code: bool = False
    """Run the model repository's own Python code. Never on by default: it executes code from the
    hub."""
    attn_implementation: AttnImplementation = "sdpa"
    """Attention kernel: `sdpa` (PyTorch), `flash_attention_2` (needs Ampere or newer and
    flash-attn), or `eager`."""

    @field_validator("id", "revision")
    @classmethod
    def _no_control_characters(cls, value: str | None) -> str | None:
        if value is not None and any(ch in value for ch in "\n\r\t\x00"):
            raise ValueError("must be a single line without control characters")
        return value


class DatasetSpec(_Frozen):
    """Where the training data comes from and how its rows are shaped."""

    path: Annotated[str, Field(min_length=1, max_length=1000)]
    """A local .jsonl/.json/.csv/.parquet file (relative paths are relative to the spec's folder),
    or a hub dataset id."""
    split: Annotated[str, Field(min_length=1, max_length=100)] = "train"
    """Dataset split to train on."""
    format: DatasetFormat
    """Row shape: `messages` (chat turns), `prompt_completion`, `text`, `preference`
    (prompt/chosen/rejected), `prompt` (GRPO)."""
    eval_fraction: Annotated[float, Field(ge=0.0, lt=1.0), NOT_A_BOOL] = 0.0
    """Share of rows held out for evaluation (0 <= x < 1); 0 disables evaluation."""
    chat_template: ChatTemplateName | None = None
    """A named chat template to install when the model's tokenizer has none (adds special tokens, so
    embeddings and lm_head are trained and saved)."""

    @field_validator("path", "split")
    @classmethod
    def _single_line(cls, value: str) -> str:
        if any(ch in value for ch in "\n\r\x00"):
            raise ValueError("must be a single line without control characters")
        return value


class HardwareSpec(_Frozen):
    """The GPU(s) the run targets; the plan's fit check uses these."""

    gpu: Annotated[str, Field(min_length=1, max_length=100)] | None = None
    """Catalogue GPU name or alias (case, space and dash insensitive), e.g. `rtx-4090`,
    `A100 80GB`."""
    vram_gib: Annotated[float, Field(ge=MIN_VRAM_GIB, le=MAX_VRAM_GIB), NOT_A_BOOL] | None = None
    """GPU memory in GiB; overrides the catalogue's figure, or replaces `gpu` when the card is not
    catalogued."""
    num_gpus: Annotated[int, Field(ge=1, le=1024), NOT_A_BOOL] = 1
    """GPUs per node."""
    num_nodes: Annotated[int, Field(ge=1, le=1024), NOT_A_BOOL] = 1
    """Machines taking part; each has `num_gpus` GPUs."""
    distributed: Distributed = "none"
    """Multi-GPU engine through accelerate: `none`, `ddp`, `fsdp`, `deepspeed-zero2`,
    `deepspeed-zero3`."""
    cpu_offload: bool = False
    """Keep sharded state in host memory: FSDP `offload_params` (parameters, gradients,
    optimizer), DeepSpeed `offload_optimizer` (ZeRO-3: `offload_param` too). Needs fsdp or
    deepspeed; slower, much less GPU memory."""
    host_memory_gib: Annotated[float, Field(gt=0, le=1048576), NOT_A_BOOL] | None = None
    """Host RAM per machine in GiB. When given, the plan checks the host memory that loading
    and `cpu_offload` need against it (a run that needs more does not fit)."""
    headroom_fraction: Annotated[float, Field(ge=0.0, lt=0.5), NOT_A_BOOL] = 0.05
    """Share of GPU memory the plan keeps free (other processes, allocator spikes): budget = memory
    x (1 - headroom)."""

    @field_validator("vram_gib", mode="before")
    @classmethod
    def _plannable_memory(cls, value: object) -> object:
        # The bounds' own message (why 0.5 GiB) rather than the schema's bare ">= 0.5".
        if isinstance(value, int | float) and not isinstance(value, bool):
            problem = vram_gib_problem(float(value))
            if problem is not None:
                raise ValueError(problem)
        return value

    @field_validator("gpu", mode="before")
    @classmethod
    def _number_as_name(cls, value: object) -> object:
        # `gpu: 3090` unquoted is a YAML integer (`4090.0` a float); it names the card all the
        # same. A fraction names none: "must be text" asks for the name.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return str(value)
        return value

    @model_validator(mode="after")
    def _gpu_or_memory(self) -> HardwareSpec:
        if self.gpu is None and self.vram_gib is None:
            raise ValueError("gpu: give `gpu` (a catalogue name) or `vram_gib` (memory in GiB)")
        world = self.num_gpus * self.num_nodes
        engine_given = "distributed" in self.model_fields_set
        if not engine_given and world > 1:
            # No engine written: `resolve` fills in the one the planner recommends.
            return self
        if self.distributed == "none" and world > 1:
            # Point at the field the user wrote: `distributed` if given, else the GPU count.
            given = "distributed" if "distributed" in self.model_fields_set else "num_gpus"
            if given == "num_gpus" and "num_gpus" not in self.model_fields_set:
                given = "num_nodes"
            raise ValueError(
                f"{given}: {world} GPUs need a `distributed` engine "
                "(ddp, fsdp, deepspeed-zero2 or deepspeed-zero3); distributed is none"
            )
        if self.distributed != "none" and world == 1:
            raise ValueError(
                f"distributed: `{self.distributed}` needs num_gpus (or num_nodes) > 1; "
                "use distributed: none"
            )
        if self.cpu_offload and self.distributed in ("none", "ddp"):
            raise ValueError(
                f"cpu_offload: needs a sharding engine (fsdp, deepspeed-zero2 or "
                f"deepspeed-zero3); distributed is {self.distributed}"
            )
        return self

    @property
    def world_size(self) -> int:
        """GPUs taking part in the run, over all nodes."""
        return self.num_gpus * self.num_nodes


class QuantizationSpec(_Frozen):
    """bitsandbytes 4-bit settings, used when the plan loads the base model in 4-bit."""

    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type: NormalFloat4 (`nf4`, best for normally distributed weights) or `fp4`."""
    bnb_4bit_use_double_quant: bool = True
    """Quantize the quantization constants too (saves ~0.4 bits per parameter)."""
    bnb_4bit_quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"
    """Storage dtype of packed 4-bit weights; FSDP needs it equal to the compute dtype."""


class LoraSpec(_Frozen):
    """peft.LoraConfig keys, passed through 1:1."""

    r: Annotated[int, Field(gt=0, le=4096), NOT_A_BOOL] = 16
    """Adapter rank: capacity of the update (8-64 typical)."""
    lora_alpha: Annotated[float, Field(gt=0), NOT_A_BOOL] = 16
    """Scaling numerator: the update is scaled by lora_alpha / r (or / sqrt(r) with rsLoRA)."""
    lora_dropout: Annotated[float, Field(ge=0.0, lt=1.0), NOT_A_BOOL] = 0.05
    """Dropout on the adapter input, 0 <= x < 1."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases to train."""
    target_modules: (
        Literal["all-linear"] | list[Annotated[str, Field(pattern=MODULE_NAME_PATTERN)]]
    ) = "all-linear"
    """`all-linear` (every linear layer but the output head) or a list of module names such as
    `[q_proj, v_proj]`."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA): adds a trained magnitude vector per adapted layer."""
    use_rslora: bool = False
    """Rank-stabilised scaling lora_alpha / sqrt(r)."""
    modules_to_save: list[Annotated[str, Field(pattern=MODULE_NAME_PATTERN)]] = []
    """Modules trained in full and saved with the adapter, e.g. `[embed_tokens, lm_head]` after
    adding tokens."""

    @field_validator("target_modules")
    @classmethod
    def _non_empty_targets(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list):
            if not value:
                raise ValueError("list at least one module name, or use all-linear")
            if len(set(value)) != len(value):
                raise ValueError("lists a module name twice")
        return value


class TrainingSpec(_Frozen):
    """Trainer arguments (trl SFTConfig / DPOConfig / GRPOConfig names)."""

    max_length: Annotated[int, Field(ge=16, le=1_048_576), NOT_A_BOOL] = 2048
    """Tokens per sequence (longer rows are truncated)."""
    per_device_train_batch_size: Annotated[int, Field(ge=1, le=4096), NOT_A_BOOL] = 1
    """Sequences per GPU per forward pass (the micro-batch)."""
    gradient_accumulation_steps: Annotated[int, Field(ge=1, le=65536), NOT_A_BOOL] = 8
    """Micro-batches per optimizer step; effective batch = micro-batch x this x GPUs."""
    num_train_epochs: Annotated[float, Field(gt=0, le=1000), NOT_A_BOOL] = 1
    """Passes over the training data (ignored when max_steps > 0)."""
    max_steps: Annotated[int, Field(ge=-1, le=100_000_000), NOT_A_BOOL] = -1
    """Optimizer steps to run (1 or more); -1 trains for num_train_epochs."""

    @field_validator("max_steps")
    @classmethod
    def _steps_or_epochs(cls, value: int) -> int:
        # transformers 5.24 trains by epochs only for max_steps < 0; 0 would stop after the
        # first step (``global_step >= max_steps``) while the plan counted epochs.
        if value == 0:
            raise ValueError("must be 1 or more, or -1 to train for num_train_epochs; got 0")
        return value

    learning_rate: Annotated[float, Field(gt=0, le=1), NOT_A_BOOL] = 2.0e-4
    """Peak learning rate."""
    lr_scheduler_type: SchedulerName = "cosine"
    """Learning-rate schedule."""
    warmup_ratio: Annotated[float, Field(ge=0.0, lt=1.0), NOT_A_BOOL] = 0.03
    """Share of steps spent warming up the learning rate."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass: much less activation memory for one more
    forward pass per step (about half again the compute of a LoRA step; the plan says how
    much for the spec)."""
    length_source: Literal["max_length", "p99"] = "max_length"
    """Length the plan sizes activations for: `max_length`, or `p99`, the data's 99th-percentile
    token length as the script tokenizes it (needs the model's tokenizer locally and the
    `train` extra); the script still truncates at max_length."""
    packing: bool = False
    """Pack several short rows into each max_length sequence (SFT only)."""
    loss_on: LossOn | None = None
    """Which tokens SFT trains on: `assistant` (the assistant turns of `messages` rows; default for
    `messages`), `completion` (the completion of `prompt_completion` rows; their default), or `all`
    (every token; the only choice for `text`). DPO and GRPO score their completions by design."""
    optim: Optim = "adamw_torch"
    """Optimizer (transformers OptimizerNames); 8-bit and paged variants use bitsandbytes."""
    seed: Annotated[int, Field(ge=0, le=2**32 - 1), NOT_A_BOOL] = 42
    """Random seed for data order and adapter initialisation."""
    logging_steps: Annotated[int, Field(ge=1), NOT_A_BOOL] = 10
    """Log every this many optimizer steps."""
    save_strategy: SaveStrategy = "steps"
    """When to write checkpoints: every `save_steps` optimizer steps (so `--resume` has one to
    continue from after a preemption), each `epoch`, or `no`."""
    save_steps: Annotated[int, Field(ge=1), NOT_A_BOOL] = 100
    """Checkpoint interval when save_strategy is `steps`."""
    save_total_limit: Annotated[int, Field(ge=1), NOT_A_BOOL] | None = 2
    """Checkpoints kept in output_dir (the oldest are deleted); `null` keeps all."""
    report_to: ReportTo = "none"
    """Experiment tracker to log to."""


class DpoSpec(_Frozen):
    """DPO settings (trl DPOConfig names); only with `method: dpo`."""

    beta: Annotated[float, Field(gt=0, le=100), NOT_A_BOOL] = 0.1
    """Strength of the pull towards the reference model."""
    loss_type: DpoLossType = "sigmoid"
    """Preference loss."""
    precompute_ref_log_probs: bool = False
    """Compute the reference model's log-probs once before training instead of at every step."""


def _known_reward(item: str) -> str:
    """A reward is a built-in name or ``path/to/file.py:function`` (checked per item, so an
    error points at the item's line)."""
    if item not in BUILTIN_REWARDS and not USER_REWARD_PATTERN.match(item):
        raise ValueError(
            f"unknown reward {item!r}: use a built-in ({', '.join(BUILTIN_REWARDS)}) "
            "or 'path/to/file.py:function'"
        )
    return item


class GrpoSpec(_Frozen):
    """GRPO settings (trl GRPOConfig names); only with `method: grpo`."""

    num_generations: Annotated[int, Field(ge=2, le=1024), NOT_A_BOOL] = 8
    """Completions sampled per prompt (the group whose rewards are compared)."""
    max_completion_length: Annotated[int, Field(ge=1, le=1_048_576), NOT_A_BOOL] = 256
    """Tokens generated per completion."""
    reward_funcs: Annotated[
        list[Annotated[str, AfterValidator(_known_reward)]], Field(min_length=1)
    ]
    """Built-in rewards (`format`, `length`) or user functions as `path/to/file.py:function`."""
    beta: Annotated[float, Field(ge=0, le=100), NOT_A_BOOL] = 0.0
    """KL penalty towards the reference model; 0 (trl's default) keeps no reference pass."""
    temperature: Annotated[float, Field(gt=0, le=10), NOT_A_BOOL] = 1.0
    """Sampling temperature for the generations."""
    use_vllm: VllmMode = False
    """Generate with vLLM (trl's `use_vllm`): `colocate` runs vLLM inside the training process on
    the same GPU (trl's `vllm_mode="colocate"`), `server` asks a `trl vllm-serve` process on other
    GPUs; `false` generates with `model.generate`; `true` (trl's spelling) is trl's default mode,
    `colocate`. Needs vLLM (the script's header names the releases trl accepts) and a CUDA GPU."""
    vllm_gpu_memory_utilization: Annotated[float, Field(gt=0, lt=1), NOT_A_BOOL] = 0.3
    """The share of each GPU's memory vLLM takes for its weights and KV cache: colocate, on the
    training GPU (trl's default 0.3); server, on the server's GPU (`trl vllm-serve
    --gpu_memory_utilization`)."""
    vllm_enable_sleep_mode: bool = False
    """Colocate only: vLLM releases its weights and KV cache during the training phase (sleep
    level 2) and takes them back for each generation round."""
    vllm_server_host: Annotated[str, Field(min_length=1, max_length=253)] = "0.0.0.0"
    """Server only: host of the `trl vllm-serve` process."""
    vllm_server_port: Annotated[int, Field(ge=1, le=65535), NOT_A_BOOL] = 8000
    """Server only: port of the `trl vllm-serve` process."""

    @field_validator("reward_funcs")
    @classmethod
    def _rewards_once(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("lists a reward twice")
        return value

    @field_validator("use_vllm", mode="before")
    @classmethod
    def _true_is_trl_s_default_mode(cls, value: object) -> object:
        # trl's own spelling, use_vllm=True, runs its default vllm_mode: colocate.
        return "colocate" if value is True else value

    @field_validator("vllm_server_host")
    @classmethod
    def _plain_host(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9.:_\[\]-]+", value):
            raise ValueError("must be a host name or an IP address")
        return value

    @model_validator(mode="after")
    def _vllm_options_fit_the_mode(self) -> GrpoSpec:
        # Keys that differ from their defaults (a spec dumped with every default filled in,
        # as emit's spec.yaml, must load again).
        defaults = GrpoSpec.model_fields
        given = {
            key
            for key in self.model_fields_set
            if key.startswith("vllm_") and getattr(self, key) != defaults[key].default
        }
        # The utilisation also sizes a server (`trl vllm-serve --gpu_memory_utilization`).
        colocate_only = ("vllm_enable_sleep_mode",)
        server_only = ("vllm_server_host", "vllm_server_port")
        if "vllm_gpu_memory_utilization" in given and not self.use_vllm:
            raise ValueError(
                "vllm_gpu_memory_utilization: applies with use_vllm: colocate (or server, "
                "for the `trl vllm-serve` command); use_vllm is false"
            )
        for key in colocate_only:
            if key in given and self.use_vllm != "colocate":
                raise ValueError(
                    f"{key}: applies to use_vllm: colocate only (use_vllm is "
                    f"{self.use_vllm or 'false'}); remove it or set use_vllm: colocate"
                )
        for key in server_only:
            if key in given and self.use_vllm != "server":
                raise ValueError(
                    f"{key}: applies to use_vllm: server only (use_vllm is "
                    f"{self.use_vllm or 'false'}); remove it or set use_vllm: server"
                )
        return self


class _SpecBase(_Frozen):
    name: Annotated[str, Field(pattern=SPEC_NAME_PATTERN, max_length=100)]
    """Experiment name: lowercase letters, digits, `.`, `_`, `-`; names the output folder and
    generated files."""
    model: ModelSpec
    dataset: DatasetSpec
    hardware: HardwareSpec
    finetuning: Finetuning = "lora"
    """`lora` (adapters on a frozen base, the default) or `full` (every weight trained: fp32 master
    weights under bf16/fp16 autocast, no `lora` or `quantization` section, no merge step)."""
    precision: Precision = "auto"
    """Base-model loading: `auto` (the planner picks bf16, else 8-bit, else 4-bit), `bf16`, `fp16`,
    `8bit`, `4bit`."""
    quantization: QuantizationSpec = QuantizationSpec()
    lora: LoraSpec = LoraSpec()
    training: TrainingSpec = TrainingSpec()
    output_dir: Annotated[str, Field(min_length=1, max_length=1000)] | None = None
    """Where checkpoints and the adapter go; defaults to `outputs/<name>`."""

    @model_validator(mode="after")
    def _format_fits_method(self) -> _SpecBase:
        method = getattr(self, "method", "sft")
        allowed = FORMATS_BY_METHOD[method]
        if self.dataset.format not in allowed:
            raise ValueError(
                f"dataset.format: {self.dataset.format!r} cannot train method {method!r}; "
                f"use one of: {', '.join(allowed)}"
            )
        if self.training.packing and method != "sft":
            raise ValueError(
                f"training.packing: packing is for SFT only; method {method!r} cannot pack"
            )
        _check_loss_on(self, method)
        _check_full_finetuning(self)
        if self.output_dir is not None and any(ch in self.output_dir for ch in "\n\r\x00"):
            raise ValueError("output_dir: must be a single line")
        if (
            self.precision == "4bit"
            and self.hardware.distributed == "fsdp"
            and _storage_set_to_uint8(self)
        ):
            # FSDP flattens parameters of one dtype; packed uint8 4-bit weights cannot be
            # sharded next to bf16 ones (the QLoRA + FSDP recipe stores them as bfloat16).
            # Point at the storage setting if written, else at the precision that needs it.
            where = "quantization.bnb_4bit_quant_storage"
            if "quantization" not in self.model_fields_set:
                where = "precision"
            raise ValueError(
                f"{where}: FSDP with 4-bit loading needs the packed weights stored in the "
                "compute dtype; set quantization.bnb_4bit_quant_storage: bfloat16"
            )
        _check_distributed_combination(self)
        return self

    @property
    def resolved_output_dir(self) -> str:
        return self.output_dir if self.output_dir is not None else f"outputs/{self.name}"

    @property
    def resolved_loss_on(self) -> LossOn:
        """``training.loss_on``, or the default for the dataset format (SFT); DPO and GRPO
        train on their completions."""
        if self.training.loss_on is not None:
            return self.training.loss_on
        return DEFAULT_LOSS_ON.get(self.dataset.format, "completion")


def _check_loss_on(spec: _SpecBase, method: str) -> None:
    loss_on = spec.training.loss_on
    if loss_on is None:
        return
    if method != "sft":
        raise ValueError(
            f"training.loss_on: is for SFT; {method} computes its loss on the sampled or "
            "preferred completions by design, so remove the key"
        )
    allowed = LOSS_ON_BY_FORMAT[spec.dataset.format]
    if loss_on not in allowed:
        raise ValueError(
            f"training.loss_on: {loss_on!r} does not apply to `{spec.dataset.format}` rows; "
            f"use one of: {', '.join(allowed)}"
        )


def _check_full_finetuning(spec: _SpecBase) -> None:
    """``finetuning: full`` trains every weight: nothing for the LoRA and quantization
    sections to configure, no bitsandbytes weights (they cannot be trained); the sharded
    engines as ``_check_full_sharded`` allows."""
    if spec.finetuning != "full":
        return
    # A section that changes anything (spec.yaml files list every default: those pass).
    for section, default in (("lora", LoraSpec()), ("quantization", QuantizationSpec())):
        if getattr(spec, section) != default:
            raise ValueError(
                f"{section}: finetuning: full trains every weight, so there is no `{section}` "
                f"section to configure; remove it, or use finetuning: lora"
            )
    if spec.precision in ("8bit", "4bit"):
        raise ValueError(
            f"precision: {spec.precision} loading cannot be fully fine-tuned: bitsandbytes "
            "weights are frozen integer codes that cannot be trained (only adapters on top "
            "of them can); use precision: bf16 (or fp16, or auto) with finetuning: full, or "
            "finetuning: lora for QLoRA"
        )
    grpo = getattr(spec, "grpo", None)
    if grpo is not None and grpo.beta > 0 and spec.dataset.chat_template is not None:
        # trl builds GRPO's reference from the model's path (grpo_trainer.py:1003): it would
        # lack the tokens the chat template adds to the trained model.
        raise ValueError(
            "dataset.chat_template: GRPO with beta > 0 and finetuning: full loads its "
            "reference from model.id, which lacks the tokens the template adds; use a model "
            "with a chat template, grpo.beta: 0, or finetuning: lora"
        )
    _check_full_sharded(spec)


def _check_full_sharded(spec: _SpecBase) -> None:
    message = full_sharded_refusal(spec)
    if message is not None:
        raise ValueError(message)


def full_sharded_refusal(spec: _SpecBase) -> str | None:
    """Why ``finetuning: full`` cannot run the spec's method under its sharded engine (None:
    it can, or the engine does not shard). Allowed: SFT, and DPO that keeps no reference
    copy. Refused: GRPO (its generation gathers the whole model on every GPU,
    trl/trainer/grpo_trainer.py:1794,1871 ``summon_full_params`` under FSDP1, trl/models/utils.py
    ``unwrap_model_for_generation`` under ZeRO-3, which the sharded estimate does not model)
    and DPO's frozen reference copy (the script's ``copy.deepcopy`` of the policy would be a
    second, unsharded model on every GPU)."""
    engine = spec.hardware.distributed
    if engine not in STATE_SHARDING_ENGINES:
        return None
    method = getattr(spec, "method", "sft")
    if method == "grpo":
        return (
            f"hardware.distributed: GRPO with finetuning: full under {engine} is not planned: "
            "the sharded estimate has no generation phase for it (FSDP and ZeRO-3 gather the "
            "whole model on every GPU to generate, summon_full_params) nor a reference model "
            "wrapped by the engine; use distributed: ddp, or finetuning: lora"
        )
    dpo = getattr(spec, "dpo", None)
    if dpo is not None and not dpo.precompute_ref_log_probs:
        return (
            f"dpo.precompute_ref_log_probs: DPO with finetuning: full under {engine} needs "
            "the reference log-probs precomputed (the frozen reference copy the script keeps "
            "otherwise would be a second, unsharded model on every GPU); set "
            "dpo.precompute_ref_log_probs: true, or use distributed: ddp"
        )
    return None


def _storage_set_to_uint8(spec: _SpecBase) -> bool:
    """``bnb_4bit_quant_storage: uint8`` written in the spec. Left out, ``resolve`` sets the
    compute dtype under FSDP / ZeRO-3, so only a written uint8 is refused."""
    quantization = spec.quantization
    return (
        "bnb_4bit_quant_storage" in quantization.model_fields_set
        and quantization.bnb_4bit_quant_storage == "uint8"
    )


def _check_distributed_combination(spec: _SpecBase) -> None:
    """Combinations the pinned stack (accelerate 1.15, bitsandbytes 0.50.2, transformers
    5.24) cannot run; each message says what to use instead."""
    engine = spec.hardware.distributed
    if engine in PARAMETER_SHARDING_ENGINES and spec.precision == "8bit":
        raise ValueError(
            f"precision: 8-bit loading cannot be sharded by {engine}: {INT8_SHARDING_REFUSED}; "
            "use precision: 4bit with quantization.bnb_4bit_quant_storage: bfloat16, or "
            "distributed: ddp"
        )
    if engine == "deepspeed-zero3" and spec.precision == "4bit" and _storage_set_to_uint8(spec):
        where = "quantization.bnb_4bit_quant_storage"
        if "quantization" not in spec.model_fields_set:
            where = "precision"
        raise ValueError(
            f"{where}: DeepSpeed ZeRO-3 partitions floating-point parameters only; 4-bit "
            "loading needs quantization.bnb_4bit_quant_storage: bfloat16"
        )
    if (
        engine in PARAMETER_SHARDING_ENGINES
        and spec.precision == "auto"
        and _storage_set_to_uint8(spec)
    ):
        where = "precision" if "precision" in spec.model_fields_set else "hardware.distributed"
        raise ValueError(
            f"{where}: precision auto may choose 4-bit loading, which {engine} can shard only with "
            "the packed weights stored in the compute dtype; set "
            "quantization.bnb_4bit_quant_storage: bfloat16, or fix precision: bf16"
        )
    trained = trained_modules_to_save(spec) if spec.finetuning == "lora" else []
    if engine == "fsdp" and trained:
        # peft 0.21.2 reads each modules_to_save copy's state_dict() to list its keys
        # (utils/other.py ModulesToSaveWrapper.adapter_state_dict) while the main process
        # alone saves; under FSDP that copy is a unit and its state_dict() an all-gather
        # the other processes never join: the save hangs (seen on two CPU processes).
        where = "lora.modules_to_save" if spec.lora.modules_to_save else "dataset.chat_template"
        raise ValueError(
            f"{where}: training {' and '.join(trained)} in full next to LoRA cannot be saved "
            "under fsdp (peft 0.21.2 reads those modules on the main process alone, a "
            "collective under FSDP: the save hangs); use distributed: deepspeed-zero3, "
            "deepspeed-zero2 or ddp"
        )
    optim = spec.training.optim
    if engine.startswith("deepspeed") and OPTIMIZERS[optim].bitsandbytes:
        # DeepSpeed's ZeRO optimizer steps an fp32 master partition of its own; a
        # bitsandbytes optimizer's quantized or paged states are not partitioned by it.
        raise ValueError(
            f"training.optim: {optim} (bitsandbytes) cannot run under {engine}, whose ZeRO "
            "optimizer partitions its own fp32 states; use adamw_torch (or adamw_torch_fused)"
        )
    if spec.hardware.cpu_offload and OPTIMIZERS[optim].bitsandbytes:
        raise ValueError(
            f"training.optim: {optim} (bitsandbytes) needs its states on the GPU, but "
            "hardware.cpu_offload runs the optimizer step on the CPU; use adamw_torch"
        )


class SftSpec(_SpecBase):
    """Supervised fine-tuning with trl's SFTTrainer."""

    method: Literal["sft"]
    """Training objective: `sft`, `dpo` or `grpo`."""


class DpoRunSpec(_SpecBase):
    """Direct preference optimisation with trl's DPOTrainer."""

    method: Literal["dpo"]
    """Training objective: `sft`, `dpo` or `grpo`."""
    dpo: DpoSpec = DpoSpec()


class GrpoRunSpec(_SpecBase):
    """Group relative policy optimisation with trl's GRPOTrainer."""

    method: Literal["grpo"]
    """Training objective: `sft`, `dpo` or `grpo`."""
    grpo: GrpoSpec

    @model_validator(mode="after")
    def _whole_generation_groups(self) -> GrpoRunSpec:
        # trl's GRPOConfig samples per_device_train_batch_size x GPUs x gradient_accumulation_steps
        # completions per generation round and refuses a round that splits a prompt's group.
        training = self.training
        world = self.hardware.world_size
        generation_batch = (
            training.per_device_train_batch_size * world * (training.gradient_accumulation_steps)
        )
        if generation_batch % self.grpo.num_generations != 0:
            raise ValueError(
                f"grpo.num_generations: {self.grpo.num_generations} must divide the generation "
                f"batch per_device_train_batch_size x GPUs x gradient_accumulation_steps = "
                f"{training.per_device_train_batch_size} x {world} x "
                f"{training.gradient_accumulation_steps} = {generation_batch} "
                "(trl samples whole groups of num_generations completions per prompt); "
                + _group_size_fixes(
                    self.grpo.num_generations,
                    training.per_device_train_batch_size,
                    world,
                    training.gradient_accumulation_steps,
                )
            )
        if self.grpo.use_vllm and self.precision == "8bit":
            # trl/generation/vllm_generation.py:344: "vLLM does not support in-flight 8-bit
            # quantization."
            raise ValueError(
                "precision: vLLM cannot load 8-bit (LLM.int8) weights (trl refuses it); use "
                "precision: 4bit, bf16 or auto, or grpo.use_vllm: false"
            )
        return self


def _group_size_fixes(groups: int, batch: int, world: int, accumulation: int) -> str:
    """Values that make the GRPO generation batch hold whole groups, each changing one key."""
    from math import gcd

    # The generation batch is a multiple of `groups` once accumulation is a multiple of
    # groups / gcd(groups, batch x world); likewise for the micro-batch.
    step = groups // gcd(groups, batch * world)
    fixes = [f"gradient_accumulation_steps: {-(-accumulation // step) * step}"]
    batch_step = groups // gcd(groups, world * accumulation)
    fixes.append(f"per_device_train_batch_size: {-(-batch // batch_step) * batch_step}")
    generation_batch = batch * world * accumulation
    divisors = [d for d in range(min(groups, generation_batch), 1, -1) if generation_batch % d == 0]
    if divisors:
        fixes.append(f"num_generations: {' or '.join(str(d) for d in divisors[:3])}")
    return "use " + ", or ".join(fixes)


Spec = Annotated[SftSpec | DpoRunSpec | GrpoRunSpec, Field(discriminator="method")]
SPEC_ADAPTER: TypeAdapter[SftSpec | DpoRunSpec | GrpoRunSpec] = TypeAdapter(Spec)
AnySpec = SftSpec | DpoRunSpec | GrpoRunSpec


def trained_modules_to_save(spec: _SpecBase) -> list[str]:
    """``lora.modules_to_save`` plus embeddings and head when a named chat template adds
    tokens: their new rows start untrained, so the seed's advice is to train and save
    both. The planner counts and the script trains exactly this list."""
    modules = list(spec.lora.modules_to_save)
    if spec.dataset.chat_template is not None:
        modules += [name for name in ("embed_tokens", "lm_head") if name not in modules]
    return modules


def spec_json_schema() -> dict[str, object]:
    """The JSON Schema editors use to complete and check spec files."""
    schema = SPEC_ADAPTER.json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "peftgen experiment spec v1"
    _one_line_descriptions(schema)
    return schema


def schema_text() -> str:
    """The JSON Schema as ``peftgen schema`` prints it and ``specs/peftgen.schema.json``
    holds it (stable key order)."""
    return json.dumps(spec_json_schema(), indent=2, sort_keys=True) + "\n"


def _one_line_descriptions(node: object) -> None:
    """Docstrings wrapped at 100 columns become one-line descriptions (editors show them
    as hover text)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "description" and isinstance(value, str):
                node[key] = " ".join(value.split())
            else:
                _one_line_descriptions(value)
    elif isinstance(node, list):
        for item in node:
            _one_line_descriptions(item)
