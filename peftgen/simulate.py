"""Measure one training step without a GPU: the real code path on fake tensors.

``plan --simulate`` builds the spec's architecture on the meta device, loads it the way the
generated script does (dtype, bitsandbytes 8-bit / 4-bit layers, what stays unquantized),
wraps it with peft and prepares it the way trl 1.16's trainers do, replaces every tensor by
a ``FakeTensor`` (shapes and dtypes, no data) and runs one optimizer step: forward with the
trainer's loss path, backward, gradient clipping and the optimizer's update. A
``TorchDispatchMode`` watches every storage the step creates and frees, so the peak of live
tensor bytes (what ``torch.cuda.max_memory_allocated`` reports) comes out per phase and per
category. It is a second estimate, independent of ``peftgen.memory``'s formulas, that
catches what a formula forgets.

Where the CPU build of a library takes a different path than a CUDA run would, the GPU path
is modelled, because the plan is for the GPU:

* fake tensors live on ``cpu`` (this torch build cannot fake ``cuda``), so autocast is the
  CPU one with the same compute dtype;
* trl's fused LM head runs Triton kernels on CUDA that fold each logits tile in place; the
  CPU fallback's tile temporaries are replaced by in-place no-ops, and only labelled tokens
  are scored (the ``compact`` CUDA path);
* bitsandbytes' ``Params4bit`` / ``Int8Params`` cannot wrap a fake tensor, so stand-in
  layers hold the same packed bytes and quantization state and call the same bitsandbytes
  ops (whose fake kernels give the shapes); 4-bit matmuls over more than 1536 rows take
  bitsandbytes' CUDA dequantize-then-``F.linear`` path, 8-bit layers ``MatMul8bitLt``;
* data-dependent shapes (``nonzero``, LLM.int8 outlier columns) are fixed by what the
  simulation knows: every label it marks valid is valid, and there are no outliers.

torch, transformers, peft, trl and bitsandbytes are imported only here, and only when a
simulation runs: the analytic plan never imports them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import math
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from peftgen import stack
from peftgen.catalog import Gpu, config_dict
from peftgen.plan import BREAKDOWN_KEYS
from peftgen.resolve import Resolved
from peftgen.spec import trained_modules_to_save

if TYPE_CHECKING:
    import torch
    from torch import nn

CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations", "temporaries")
"""What a live byte is, for the per-phase table."""


BNB_4BIT_BLOCKSIZE = 64
"""Weights per absmax in bitsandbytes 4-bit quantization (transformers' default)."""
BNB_NESTED_BLOCKSIZE = 256
"""Absmax values per second-level absmax with double quantization."""
BNB_4BIT_CUSTOM_KERNEL_MAX_ROWS = 1536
"""bitsandbytes' CUDA gemm_4bit dequantizes the weight and calls F.linear above this many
rows (below, its fused kernel allocates only the output; at 5..1536 rows a per-GPU
heuristic may still pick the dequantize path: the simulation takes the fused kernel)."""
BNB_PAGED_MIN_NUMEL = 100_000
"""bitsandbytes pages a state buffer only for parameters this large (optimizer.py:383);
smaller ones, e.g. LoRA A of r x 4096 = 65536 at r=16, stay in ordinary device memory."""
MAX_GRAD_NORM = 1.0
"""transformers' default ``max_grad_norm``: the Trainer clips every step."""


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class PhasePeak:
    """Live bytes at the peak of one phase, split by what they are."""

    peak_allocated_bytes: int
    by_category: dict[str, int]

    def to_json(self) -> dict[str, int]:
        return {
            "peak_allocated_bytes": self.peak_allocated_bytes,
            **{f"{name}_bytes": self.by_category.get(name, 0) for name in CATEGORIES},
        }


@dataclass(frozen=True)
class SimulationResult:
    """One simulated step: its overall peak, the breakdown at that peak, per-phase peaks."""

    precision: str
    peak_allocated_bytes: int
    breakdown: dict[str, int]
    """At the overall peak, by the analytic breakdown's keys (``overhead_bytes`` is not
    simulated and stays 0: allocator rounding and the CUDA context are no tensors)."""
    phases: dict[str, PhasePeak]
    static_bytes: dict[str, int]
    """Bytes that live for the whole run: ``weights``, ``adapter``, ``optimizer``."""
    managed_bytes: int
    """Paged optimizer state (CUDA managed memory): outside the peak, reported apart."""
    peak_phase: str
    seconds: float
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "breakdown": dict(self.breakdown),
            "phases": {name: peak.to_json() for name, peak in self.phases.items()},
            "peak_phase": self.peak_phase,
            "managed_bytes": self.managed_bytes,
            "seconds": round(self.seconds, 3),
            "notes": list(self.notes),
        }


# --------------------------------------------------------------------------- tracking


@dataclass
class _Record:
    """One storage the step allocated (or that existed before it)."""

    nbytes: int
    born: int
    died: int | None = None
    category: str = "temporaries"
    breakdown_key: str = "activation_bytes"
    in_lm_head: bool = False
    forward_born: bool = False
    origin: str = ""
    """The op that made it (for explaining a disagreement)."""


@dataclass
class _PhaseMark:
    name: str
    start: int
    end: int = -1
    peak_tick: int = -1
    peak_bytes: int = -1


class _StorageTracker:
    """Live untyped storages by identity; a weakref finalizer notes when each dies.

    Every record keeps its birth and death tick, so the composition at a phase's peak is
    rebuilt at the end with each storage's final category (an output that turns out to be
    saved for backward is an activation, even if nobody knew when it was made).
    """

    def __init__(self) -> None:
        self.records: dict[int, _Record] = {}
        self.history: list[_Record] = []
        self.tick = 0
        self.live_bytes = 0
        self.phases: list[_PhaseMark] = []
        self.in_lm_head = False
        self.in_forward = False
        self.current_op = ""

    # -- bookkeeping
    def track(
        self, tensor: torch.Tensor, category: str | None = None, key: str | None = None
    ) -> None:
        storage = tensor.untyped_storage()
        ident = storage._cdata
        record = self.records.get(ident)
        if record is None:
            self.tick += 1
            record = _Record(
                nbytes=storage.nbytes(),
                born=self.tick,
                in_lm_head=self.in_lm_head,
                forward_born=self.in_forward,
                origin=self.current_op,
            )
            if self.in_lm_head:
                record.breakdown_key = "logits_bytes"
            self.records[ident] = record
            self.history.append(record)
            self.live_bytes += record.nbytes
            weakref.finalize(storage, self._release, ident)
            self._note_peak()
        if category is not None:
            record.category = category
        if key is not None:
            record.breakdown_key = key

    def mark_saved(self, tensor: torch.Tensor) -> None:
        record = self.records.get(tensor.untyped_storage()._cdata)
        if record is not None and record.category == "temporaries":
            record.category = "activations"

    def _release(self, ident: int) -> None:
        record = self.records.pop(ident, None)
        if record is None:
            return
        self.tick += 1
        record.died = self.tick
        self.live_bytes -= record.nbytes

    def _note_peak(self) -> None:
        if self.phases:
            mark = self.phases[-1]
            if mark.end < 0 and self.live_bytes > mark.peak_bytes:
                mark.peak_bytes = self.live_bytes
                mark.peak_tick = self.tick

    # -- phases
    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        mark = _PhaseMark(name, start=self.tick, peak_tick=self.tick, peak_bytes=self.live_bytes)
        self.phases.append(mark)
        try:
            yield
        finally:
            mark.end = self.tick

    def forward_done(self) -> None:
        """What the forward leaves alive is held for backward: an activation."""
        for record in self.records.values():
            if record.forward_born and record.category == "temporaries":
                record.category = "activations"

    def composition(self, tick: int) -> tuple[dict[str, int], dict[str, int]]:
        """Bytes alive at ``tick`` by category and by breakdown key."""
        categories = dict.fromkeys(CATEGORIES, 0)
        breakdown = dict.fromkeys(BREAKDOWN_KEYS, 0)
        for record in self.history:
            if record.born <= tick and (record.died is None or record.died > tick):
                categories[record.category] += record.nbytes
                breakdown[record.breakdown_key] += record.nbytes
        return categories, breakdown


def _make_dispatch_mode(tracker: _StorageTracker, state: _SimState) -> Any:
    """The ``TorchDispatchMode`` that feeds every op's outputs to the tracker.

    A few ops are answered by their CUDA implementation instead of their fake kernel, op
    for op, so that the intermediates the GPU allocates are counted too (inside a handler
    the mode is off, so each intermediate is tracked by hand).
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    ops = torch.ops
    handlers: dict[Any, Callable[..., Any]] = {
        ops.aten.nonzero.default: lambda mask: _all_valid_nonzero(mask, state),
        ops.aten.index.Tensor: lambda source, indices: ops.aten.index.Tensor(
            source, _long_indices(indices, state)
        ),
        ops.bitsandbytes.int8_vectorwise_quant.default: _int8_quant_without_outliers,
        ops.bitsandbytes.int8_mixed_scaled_mm.default: lambda *a, **k: _int8_mixed_mm(
            tracker, *a, **k
        ),
        ops.bitsandbytes.int8_scaled_mm.default: lambda *a, **k: _int8_scaled_mm(tracker, *a, **k),
        ops.bitsandbytes.gemm_4bit.default: lambda *a, **k: _gemm_4bit(tracker, *a, **k),
    }

    class LiveStorageMode(TorchDispatchMode):  # type: ignore[no-untyped-call]
        def __torch_dispatch__(
            self,
            func: Any,
            types: Any,
            args: tuple[Any, ...] = (),
            kwargs: dict[str, Any] | None = None,
        ) -> Any:
            handler = handlers.get(func)
            tracker.current_op = func.__name__
            out = handler(*args, **(kwargs or {})) if handler else func(*args, **(kwargs or {}))
            for leaf in tree_leaves(out):
                if isinstance(leaf, torch.Tensor):
                    tracker.track(leaf)
            return out

    return LiveStorageMode()  # type: ignore[no-untyped-call]


def _all_valid_nonzero(mask: torch.Tensor, state: _SimState) -> torch.Tensor:
    """``nonzero`` on fake data: the simulation says how many entries are set.

    trl selects labelled tokens with a boolean mask; the simulation built the labels, so it
    knows the count (``state.valid_count``), and otherwise every entry counts.
    """
    import torch

    count = state.valid_count if state.valid_count is not None else mask.numel()
    return torch.empty((count, mask.dim()), dtype=torch.long, device=mask.device)


def _long_indices(indices: list[Any], state: _SimState) -> list[Any]:
    """Boolean mask indices as the integer indices ``nonzero`` would give."""
    import torch

    expanded: list[Any] = []
    for index in indices:
        if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
            expanded.extend(_all_valid_nonzero(index, state).unbind(1))
        else:
            expanded.append(index)
    return expanded


def _int8_quant_without_outliers(
    A: torch.Tensor, threshold: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """LLM.int8 quantization as if no column crossed the outlier threshold.

    The outlier columns are data-dependent; real activations have a handful, whose fp16
    slice is negligible next to the int8 copies, so the simulation assumes none.
    """
    import torch

    rows, stats, _ = torch.ops.bitsandbytes.int8_vectorwise_quant.default(A, 0.0)
    outliers = torch.empty((0,), dtype=torch.int64, device=A.device) if threshold > 0.0 else None
    return rows, stats, outliers


def _int8_mixed_mm(
    tracker: _StorageTracker,
    A: torch.Tensor,
    CA: torch.Tensor,
    CB: torch.Tensor,
    SCA: torch.Tensor,
    SCB: torch.Tensor,
    outlier_cols: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' ``int8_mixed_scaled_mm`` with no outlier columns (its default kernel)."""
    import torch

    sub_a = torch.empty((0,), dtype=A.dtype, device=A.device)
    return _int8_scaled_mm(tracker, CA, CB, SCA, SCB, bias=bias, dtype=A.dtype), sub_a


def _int8_scaled_mm(
    tracker: _StorageTracker,
    A: torch.Tensor,
    B: torch.Tensor,
    row_stats: torch.Tensor,
    col_stats: torch.Tensor,
    bias: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """bitsandbytes' ``int8_scaled_mm``: an int32 product, then dequantized."""
    import torch

    product = torch.ops.bitsandbytes.int8_linear_matmul.default(A, B)
    tracker.track(product)
    return torch.ops.bitsandbytes.int8_mm_dequant.default(  # type: ignore[no-any-return]
        product, row_stats, col_stats, dtype=dtype or torch.float16, bias=bias
    )


def _gemm_4bit(
    tracker: _StorageTracker,
    A: torch.Tensor,
    B: torch.Tensor,
    shapeB: list[int],
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    bias: torch.Tensor | None = None,
    absmax_8bit: torch.Tensor | None = None,
    absmax_code: torch.Tensor | None = None,
    absmax_offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """bitsandbytes' CUDA ``gemm_4bit``: above 1536 rows, ``_dequant_linear_fallback``.

    Up to 1536 rows a fused kernel reads the packed weight directly and allocates only
    the output; beyond, the weight is dequantized whole and multiplied with ``F.linear``.
    """
    import torch

    rows = A.numel() // A.shape[-1]
    if rows <= BNB_4BIT_CUSTOM_KERNEL_MAX_ROWS:
        return torch.empty((*A.shape[:-1], shapeB[0]), dtype=A.dtype, device=A.device)
    if absmax_8bit is not None:
        assert absmax_code is not None and absmax_offset is not None
        absmax_dq = torch.ops.bitsandbytes.dequantize_blockwise.default(
            absmax_8bit, absmax, absmax_code, BNB_NESTED_BLOCKSIZE, torch.float32
        )
        tracker.track(absmax_dq)
        absmax = absmax_dq + absmax_offset
        tracker.track(absmax)
        del absmax_dq
    weight = torch.ops.bitsandbytes.dequantize_4bit.default(
        B, absmax, blocksize, quant_type, list(shapeB), A.dtype
    )
    tracker.track(weight)
    return torch.nn.functional.linear(A, weight, bias)


# --------------------------------------------------------------------------- the step


@dataclass
class _SimState:
    valid_count: int | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _StepShape:
    """Token counts the step runs with, from the spec (the same inputs the analytic plan uses)."""

    batch_size: int
    seq_len: int
    generation_rows: int = 0
    prompt_len: int = 0
    completion_len: int = 0


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """``name``'s log records below ERROR dropped meanwhile: bitsandbytes logs a line per
    8-bit matmul of the simulated step ("inputs will be cast ... to float16", 416 for a
    7B model), about fake tensors on the CPU, not about the user's run."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def simulate_candidate(
    resolved: Resolved, precision: str, gpu: Gpu | None = None
) -> SimulationResult:
    """Run one training step of ``resolved`` loaded at ``precision`` on fake tensors.

    ``gpu`` (default: the spec's) decides the compute dtype: bf16 where the GPU has it,
    else fp16, as the generated script chooses.
    """
    target = gpu or resolved.gpu
    compute_dtype = stack.compute_dtype(precision, target.bf16)
    started = time.perf_counter()
    with warnings.catch_warnings(), _quiet_logger("bitsandbytes"):
        warnings.simplefilter("ignore")
        result = _simulate(resolved, precision, compute_dtype)
    return dataclasses.replace(result, seconds=time.perf_counter() - started)


def _simulate(resolved: Resolved, precision: str, compute_dtype: str) -> SimulationResult:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    spec = resolved.loaded.spec
    torch.manual_seed(0)
    state = _SimState()
    model = build_model(resolved, precision, compute_dtype, state.notes)
    tracker = _StorageTracker()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    packed = spec.method == "sft" and spec.training.packing
    with fake_mode, _gpu_lm_head_kernels(tracker), _gpu_functions(), _sequences(packed):
        static = _materialize(model, tracker)
        optimizer, managed_bytes = _make_optimizer(model, spec.training.optim, tracker)
        static["optimizer"] = sum(
            record.nbytes
            for record in tracker.records.values()
            if record.category == "optimizer_state"
        )
        _hook_gradients(model, tracker)
        with _make_dispatch_mode(tracker, state):
            _run_step(model, optimizer, resolved, compute_dtype, tracker, state)
    phases: dict[str, PhasePeak] = {}
    best: tuple[int, str, dict[str, int]] = (-1, "", {})
    for mark in tracker.phases:
        categories, breakdown = tracker.composition(mark.peak_tick)
        phases[mark.name] = PhasePeak(mark.peak_bytes, categories)
        if mark.peak_bytes > best[0]:
            best = (mark.peak_bytes, mark.name, breakdown)
    peak_bytes, peak_phase, breakdown = best
    return SimulationResult(
        precision=precision,
        peak_allocated_bytes=peak_bytes,
        breakdown=breakdown,
        phases=phases,
        static_bytes=static,
        managed_bytes=managed_bytes,
        peak_phase=peak_phase,
        seconds=0.0,
        notes=tuple(state.notes),
    )


def _run_step(
    model: Any,
    optimizer: Any,
    resolved: Resolved,
    compute_dtype: str,
    tracker: _StorageTracker,
    state: _SimState,
) -> None:
    import torch

    spec = resolved.loaded.spec
    shape = step_shape(resolved)
    autocast_dtype = torch.bfloat16 if compute_dtype == "bf16" else torch.float16
    if spec.method == "grpo":
        with tracker.phase("generation"), torch.no_grad():
            _generate(model, shape, autocast_dtype)
    if spec.training.gradient_accumulation_steps > 1:
        _accumulated_gradients(model, tracker)
    with tracker.phase("forward"):
        tracker.in_forward = True
        saved = torch.autograd.graph.saved_tensors_hooks(_pack_hook(tracker), lambda t: t)
        with saved, torch.autocast("cpu", dtype=autocast_dtype):
            loss = _loss(model, spec.method, shape, state)
        tracker.in_forward = False
        tracker.forward_done()
    with tracker.phase("backward"):
        loss.backward()  # type: ignore[no-untyped-call]
        del loss
    with tracker.phase("optimizer_step"):
        trainable = [p for p in model.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _accumulated_gradients(model: Any, tracker: _StorageTracker) -> None:
    """Gradients of the earlier micro-batches: from the second micro-batch of an
    accumulation window on, they are alive through forward and backward."""
    import torch

    for param in model.parameters():
        if param.requires_grad:
            param.grad = torch.zeros_like(param)
            tracker.track(param.grad, category="gradients", key="gradient_bytes")


def _pack_hook(tracker: _StorageTracker) -> Callable[[torch.Tensor], torch.Tensor]:
    def pack(tensor: torch.Tensor) -> torch.Tensor:
        tracker.mark_saved(tensor)
        return tensor

    return pack


def step_shape(resolved: Resolved) -> _StepShape:
    """Rows and tokens per micro-batch, as the trainer forms them.

    SFT: ``per_device_train_batch_size`` rows of ``max_length`` tokens (full rows: the peak
    is reached on the longest batch). DPO: chosen and rejected concatenated, twice the rows.
    GRPO: the generation batch is ``per_device_train_batch_size × steps_per_generation``
    (trl's default ``steps_per_generation = gradient_accumulation_steps``) completions of
    ``max_completion_length`` after prompts of ``max_length`` (the longest prompt the
    dataset preparation keeps); the training micro-batch is ``per_device_train_batch_size``
    of those rows.
    """
    spec = resolved.loaded.spec
    training = spec.training
    rows = training.per_device_train_batch_size
    if spec.method == "dpo":
        return _StepShape(batch_size=2 * rows, seq_len=training.max_length)
    if spec.method == "grpo":
        completion = spec.grpo.max_completion_length
        prompt = training.max_length
        return _StepShape(
            batch_size=rows,
            seq_len=prompt + completion,
            generation_rows=rows * training.gradient_accumulation_steps,
            prompt_len=prompt,
            completion_len=completion,
        )
    return _StepShape(batch_size=rows, seq_len=training.max_length)


def _token_ids(rows: int, length: int, vocab_size: int) -> torch.Tensor:
    import torch

    return torch.randint(0, vocab_size, (rows, length), dtype=torch.long)


def _loss(model: Any, method: str, shape: _StepShape, state: _SimState) -> torch.Tensor:
    """The trainer's loss: fused LM head log-probs, per method."""
    import torch

    vocab = _vocab_size(model)
    input_ids = _token_ids(shape.batch_size, shape.seq_len, vocab)
    labels = input_ids.clone()
    if method == "sft":
        state.valid_count = shape.batch_size * (shape.seq_len - 1)
        outputs = model(input_ids=input_ids, labels=labels, fused_lm_head=True, use_cache=False)
        state.valid_count = None
        loss: torch.Tensor = outputs.loss
        return loss
    if method == "dpo":
        state.valid_count = shape.batch_size * (shape.seq_len - 1)
        outputs = model(input_ids=input_ids, labels=labels, fused_lm_head=True, use_cache=False)
        logps = outputs.log_probs.sum(dim=1)
        chosen, rejected = logps.chunk(2, dim=0)
        with torch.no_grad(), _checkpointing_disabled(model), model.disable_adapter():
            ref = model(input_ids=input_ids, labels=labels, fused_lm_head=True, use_cache=False)
            ref_chosen, ref_rejected = ref.log_probs.sum(dim=1).chunk(2, dim=0)
            del ref
        state.valid_count = None
        delta = (chosen - ref_chosen) - (rejected - ref_rejected)
        dpo_loss: torch.Tensor = -torch.nn.functional.logsigmoid(0.1 * delta).mean()
        return dpo_loss
    # grpo: only the completion tokens carry labels
    state.valid_count = shape.batch_size * shape.completion_len
    outputs = model(input_ids=input_ids, labels=labels, fused_lm_head=True, use_cache=False)
    state.valid_count = None
    logps = outputs.log_probs
    advantages = torch.zeros((shape.batch_size, 1), dtype=torch.float32)
    ratio = torch.exp(logps - logps.detach())
    grpo_loss: torch.Tensor = -(ratio * advantages).sum() / logps.numel()
    return grpo_loss


@contextlib.contextmanager
def _checkpointing_disabled(model: Any) -> Iterator[None]:
    from trl.models.utils import disable_gradient_checkpointing

    with disable_gradient_checkpointing(model, None):
        yield


def _generate(model: Any, shape: _StepShape, autocast_dtype: torch.dtype) -> None:
    """GRPO's ``model.generate`` with a growing ``DynamicCache``, at its largest.

    Prefill the prompts, then stand the cache at its final length minus one and decode the
    last token: the peak of generation is the full KV cache plus one decode step. The
    cache grows by concatenation, so the last step briefly holds one layer's old and new
    tensors, as on the GPU.
    """
    import torch
    from transformers import DynamicCache

    base = _base_model(model)
    vocab = _vocab_size(model)
    rows = shape.generation_rows
    with (
        _checkpointing_disabled(model),
        torch.autocast("cpu", dtype=autocast_dtype),
    ):
        cache = DynamicCache(config=base.config)
        prompt = _token_ids(rows, shape.prompt_len, vocab)
        out = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        del out, prompt
        final_len = shape.prompt_len + shape.completion_len - 1
        layers: list[Any] = list(cache.layers)
        for layer in layers:
            keys = layer.keys
            if keys is None:
                continue
            grown = (*keys.shape[:2], final_len, keys.shape[-1])
            layer.keys = torch.empty(grown, dtype=keys.dtype)
            values = layer.values
            layer.values = torch.empty(
                (*values.shape[:2], final_len, values.shape[-1]), dtype=values.dtype
            )
            del keys, values
        step = _token_ids(rows, 1, vocab)
        position = torch.full((rows, 1), final_len, dtype=torch.long)
        out = model(
            input_ids=step,
            past_key_values=cache,
            position_ids=position,
            use_cache=True,
            logits_to_keep=1,
        )
        next_logits = out.logits[:, -1, :].to(copy=True, dtype=torch.float32)
        del out
        probs = torch.softmax(next_logits, dim=-1)
        torch.multinomial(probs, num_samples=1)
        del probs, next_logits, cache


# --------------------------------------------------------------------------- model


def transformers_config(resolved: Resolved) -> Any:
    """The transformers config of the catalogued architecture, as ``from_pretrained`` reads it."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(**config_dict(resolved.arch))
    config.use_cache = False
    return config


def _attn_implementation(resolved: Resolved) -> str:
    """FlashAttention-2 cannot run on the CPU; its memory behaves like SDPA's flash kernel."""
    requested = resolved.loaded.spec.model.attn_implementation
    return "eager" if requested == "eager" else "sdpa"


def _from_config(config: Any, dtype: torch.dtype, attn: str, notes: list[str]) -> Any:
    """The model on the meta device; eager attention where transformers refuses SDPA.

    transformers 5.24 raises for SDPA on some families (Gemma-2's soft-capped attention);
    the script would have to run eager there, and so does the simulation (with a note).
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        try:
            return AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
                config, dtype=dtype, attn_implementation=attn
            )
        except ValueError as error:
            if attn == "eager" or "attention implementation" not in str(error):
                raise
            notes.append(f"{config.model_type}: transformers refuses {attn}; simulated eager")
            return AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
                config, dtype=dtype, attn_implementation="eager"
            )


def build_model(
    resolved: Resolved, precision: str, compute_dtype: str = "bf16", notes: list[str] | None = None
) -> Any:
    """The PEFT model on the meta device, loaded and prepared as the trainer has it."""
    import torch

    spec = resolved.loaded.spec
    dtype = torch.bfloat16 if compute_dtype == "bf16" else torch.float16
    config = transformers_config(resolved)
    full = spec.finetuning == "full"
    model = _from_config(
        config,
        torch.float32 if full else dtype,  # full fine-tuning: fp32 master weights
        _attn_implementation(resolved),
        [] if notes is None else notes,
    )
    model.tie_weights()  # from_pretrained ties the output head to the embeddings; from_config not
    if full:
        return _prepare_full(model, resolved, gc=spec.training.gradient_checkpointing)
    if precision in ("8bit", "4bit"):
        _quantize_linears(model, precision, resolved, dtype)
    return _prepare_peft(
        model,
        resolved,
        quantized=precision in ("8bit", "4bit"),
        gc=spec.training.gradient_checkpointing,
    )


def _quantize_linears(
    model: Any, precision: str, resolved: Resolved, compute_dtype: torch.dtype
) -> None:
    """Swap every ``nn.Linear`` transformers would quantize for a bitsandbytes stand-in."""
    from torch import nn
    from transformers.quantizers.base import get_keys_to_not_convert

    skip = set(get_keys_to_not_convert(model))
    quantization = resolved.loaded.spec.quantization
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        if any(name == key or name.endswith("." + key) or key in name.split(".") for key in skip):
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if precision == "4bit":
            replacement: nn.Module = make_linear_4bit(
                module,
                quant_type=quantization.bnb_4bit_quant_type,
                double_quant=quantization.bnb_4bit_use_double_quant,
                compute_dtype=compute_dtype,
            )
        else:
            replacement = make_linear_8bit(module)
        setattr(parent, leaf, replacement)
    flag = "is_loaded_in_4bit" if precision == "4bit" else "is_loaded_in_8bit"
    setattr(model, flag, True)
    model.is_quantized = True


def make_linear_4bit(
    linear: Any, quant_type: str, double_quant: bool, compute_dtype: torch.dtype
) -> Any:
    """A ``bnb.nn.Linear4bit`` whose packed weight and quant state are plain tensors.

    Same bytes as bitsandbytes stores: the packed weight ``(numel + 1) // 2`` uint8 as
    ``[n, 1]``; absmax per 64 weights (fp32, or uint8 with double quantization plus the
    fp32 second-level absmax per 256, its 256-entry code and an fp32 offset); the 16-entry
    fp32 code of the 4-bit type.
    """
    bnb: Any = importlib.import_module("bitsandbytes")
    import torch
    from torch import nn

    out_features, in_features = linear.weight.shape
    layer = bnb.nn.Linear4bit.__new__(bnb.nn.Linear4bit)
    nn.Module.__init__(layer)
    layer.in_features = in_features
    layer.out_features = out_features
    layer.compute_dtype = compute_dtype
    layer.compute_type_is_set = True
    layer.quant_state = None
    layer.quant_storage = torch.uint8
    layer.support_avx512bf16_for_cpu = False
    layer.weight = nn.Parameter(
        torch.empty(((in_features * out_features + 1) // 2, 1), dtype=torch.uint8, device="meta"),
        requires_grad=False,
    )
    layer.weight.quant_type = quant_type
    layer.weight.compress_statistics = double_quant
    layer.weight.blocksize = BNB_4BIT_BLOCKSIZE
    layer._sim_4bit = (quant_type, double_quant, compute_dtype)
    layer.bias = (
        None
        if linear.bias is None
        else nn.Parameter(torch.empty_like(linear.bias, device="meta"), requires_grad=False)
    )
    return layer


def quant_state_4bit(
    out_features: int, in_features: int, quant_type: str, double_quant: bool, dtype: torch.dtype
) -> Any:
    """A bitsandbytes ``QuantState`` with fake tensors of the sizes bitsandbytes allocates."""
    import torch

    QuantState: Any = importlib.import_module("bitsandbytes.functional").QuantState

    numel = out_features * in_features
    blocks = math.ceil(numel / BNB_4BIT_BLOCKSIZE)
    code = torch.empty((16,), dtype=torch.float32)
    if not double_quant:
        return QuantState(
            absmax=torch.empty((blocks,), dtype=torch.float32),
            shape=torch.Size((out_features, in_features)),
            code=code,
            blocksize=BNB_4BIT_BLOCKSIZE,
            quant_type=quant_type,
            dtype=dtype,
        )
    nested = QuantState(
        absmax=torch.empty((math.ceil(blocks / BNB_NESTED_BLOCKSIZE),), dtype=torch.float32),
        code=torch.empty((256,), dtype=torch.float32),
        blocksize=BNB_NESTED_BLOCKSIZE,
        dtype=torch.float32,
    )
    return QuantState(
        absmax=torch.empty((blocks,), dtype=torch.uint8),
        shape=torch.Size((out_features, in_features)),
        code=code,
        blocksize=BNB_4BIT_BLOCKSIZE,
        quant_type=quant_type,
        dtype=dtype,
        offset=torch.empty((), dtype=torch.float32),
        state2=nested,
    )


def _forward_4bit(self: Any, x: torch.Tensor) -> torch.Tensor:
    """``bnb.nn.Linear4bit.forward`` on the GPU path (no CPU weight repacking)."""
    bnb: Any = importlib.import_module("bitsandbytes")

    input_dtype = x.dtype
    x = x.to(self.compute_dtype)
    bias = None if self.bias is None else self.bias.to(self.compute_dtype)
    out: torch.Tensor = bnb.matmul_4bit(
        x, self.weight.t(), bias=bias, quant_state=self.weight.quant_state
    )
    return out.to(input_dtype)


def make_linear_8bit(linear: Any) -> Any:
    """A ``bnb.nn.Linear8bitLt`` without fp16 weights: int8 ``CB``, fp32 row scales ``SCB``."""
    bnb: Any = importlib.import_module("bitsandbytes")
    import torch
    from bitsandbytes.autograd._functions import MatmulLtState
    from torch import nn

    out_features, in_features = linear.weight.shape
    layer = bnb.nn.Linear8bitLt.__new__(bnb.nn.Linear8bitLt)
    nn.Module.__init__(layer)
    layer.in_features = in_features
    layer.out_features = out_features
    layer.index = None
    layer.state = MatmulLtState()
    layer.state.threshold = 6.0
    layer.state.has_fp16_weights = False
    layer.weight = nn.Parameter(
        torch.empty((out_features, in_features), dtype=torch.int8, device="meta"),
        requires_grad=False,
    )
    layer.register_buffer(
        "weight_scb", torch.empty((out_features,), dtype=torch.float32, device="meta")
    )
    layer.bias = (
        None
        if linear.bias is None
        else nn.Parameter(torch.empty_like(linear.bias, device="meta"), requires_grad=False)
    )
    layer._sim_8bit = True
    return layer


def _forward_8bit(self: Any, x: torch.Tensor) -> torch.Tensor:
    """``bnb.nn.Linear8bitLt.forward`` on the CUDA path (``MatMul8bitLt``, not the CPU one)."""
    from bitsandbytes.autograd._functions import MatMul8bitLt

    self.state.is_training = self.training
    self.state.CB = self.weight
    self.state.SCB = self.weight_scb
    bias = self.bias
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    out: torch.Tensor = MatMul8bitLt.apply(x, self.weight, None, bias, self.state)  # type: ignore[no-untyped-call]
    return out


def _prepare_peft(model: Any, resolved: Resolved, quantized: bool, gc: bool) -> Any:
    """peft wrapping and trl 1.16's preparation for PEFT, in the trainer's order, then the
    script's fp32 cast of its trained copies (``stack.TRAINED_COPY_DTYPE``)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    spec = resolved.loaded.spec
    lora = spec.lora
    modules_to_save = trained_modules_to_save(spec)
    tied_copies = stack.shares_tied_copy(resolved.arch.config.tie_word_embeddings, modules_to_save)
    target = (
        lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    )
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,  # type: ignore[arg-type]  # peft accepts floats
        lora_dropout=lora.lora_dropout,
        bias=lora.bias,
        target_modules=target,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        modules_to_save=modules_to_save or None,
        # as the script sets it: one trained copy of tied embeddings
        ensure_weight_tying=tied_copies,
        task_type="CAUSAL_LM",
    )
    # peft 0.21.2 skips ensure_weight_tying under low_cpu_mem_usage
    peft_model: Any = get_peft_model(model, peft_config, low_cpu_mem_usage=not tied_copies)
    if gc:
        peft_model.enable_input_require_grads()
    if quantized:
        for name, param in peft_model.named_parameters():
            if param.requires_grad and "lora_magnitude_vector" not in name:
                param.data = param.data.to(torch.bfloat16)
    base = peft_model.get_base_model()
    if gc:
        enable = getattr(base, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=None)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=None)
    outputs = {
        "sft": ("log_probs", "entropy", "is_top1"),
        "dpo": ("log_probs", "entropy", "mean_logits", "is_top1"),
        "grpo": ("log_probs", "entropy"),
    }[spec.method]
    add_fused_lm_head(base, outputs=outputs)
    if quantized or modules_to_save:
        # the generated script: fp32 master weights for full copies on a 16-bit base, and
        # for every trainable weight of a quantized model (trl cast them to bf16)
        master = getattr(torch, stack.TORCH_DTYPE_NAMES[stack.TRAINED_COPY_DTYPE])
        for param in peft_model.parameters():
            if param.requires_grad and param.dtype != master:
                param.data = param.data.to(master)
    peft_model.train()
    return peft_model


def _prepare_full(model: Any, resolved: Resolved, gc: bool) -> Any:
    """``finetuning: full`` as the script runs it: no peft, every fp32 weight trainable,
    trl's fused LM head; the step runs under the compute dtype's autocast (``_run_step``).
    DPO's frozen reference copy (compute dtype, no gradients) is not simulated."""
    from trl.trainer.utils import add_fused_lm_head

    spec = resolved.loaded.spec
    if gc:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=None)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=None)
    outputs = {
        "sft": ("log_probs", "entropy", "is_top1"),
        "dpo": ("log_probs", "entropy", "mean_logits", "is_top1"),
        "grpo": ("log_probs", "entropy"),
    }[spec.method]
    add_fused_lm_head(model, outputs=outputs)
    model.train()
    return model


def _base_model(model: Any) -> Any:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base is not None else model


def _vocab_size(model: Any) -> int:
    return int(_base_model(model).config.get_text_config().vocab_size)


# --------------------------------------------------------------------------- fake tensors


def _materialize(model: Any, tracker: _StorageTracker) -> dict[str, int]:
    """Replace every meta parameter and buffer by a fake CPU tensor and count it.

    Called inside the ``FakeTensorMode``. Shared parameters (tied embeddings) stay shared.
    Returns the static bytes: frozen weights (and buffers, quant states) and adapters.
    """
    import torch
    from torch import nn

    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            new = replaced.get(id(param))
            if new is None:
                new = nn.Parameter(
                    torch.empty(param.shape, dtype=param.dtype), requires_grad=param.requires_grad
                )
                for attr in ("quant_type", "compress_statistics", "blocksize"):
                    if hasattr(param, attr):
                        setattr(new, attr, getattr(param, attr))
                replaced[id(param)] = new
            module._parameters[name] = new
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype)
        sim_4bit = getattr(module, "_sim_4bit", None)
        if sim_4bit is not None:
            module.weight.quant_state = quant_state_4bit(
                module.out_features, module.in_features, *sim_4bit
            )
            module.forward = _forward_4bit.__get__(module)
        if getattr(module, "_sim_8bit", False):
            module.forward = _forward_8bit.__get__(module)
    weights = adapter = 0
    for module in model.modules():
        for tensor in _module_tensors(module):
            trainable = isinstance(tensor, nn.Parameter) and tensor.requires_grad
            before = tracker.records.get(tensor.untyped_storage()._cdata)
            tracker.track(
                tensor,
                category="parameters",
                key="adapter_bytes" if trainable else "weights_bytes",
            )
            if before is None:
                nbytes = tensor.untyped_storage().nbytes()
                if trainable:
                    adapter += nbytes
                else:
                    weights += nbytes
    return {"weights": weights, "adapter": adapter}


def _module_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """A module's own parameters, buffers and bitsandbytes quantization state tensors."""
    for param in module._parameters.values():
        if param is not None:
            yield param
    for buffer in module._buffers.values():
        if buffer is not None:
            yield buffer
    weight = module._parameters.get("weight")
    quant_state = getattr(weight, "quant_state", None) if weight is not None else None
    if quant_state is not None:
        yield from (quant_state.absmax, quant_state.code)
        if quant_state.nested:
            yield from (quant_state.offset, quant_state.state2.absmax, quant_state.state2.code)


def _hook_gradients(model: Any, tracker: _StorageTracker) -> None:
    for param in model.parameters():
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(
                lambda p: tracker.track(p.grad, category="gradients", key="gradient_bytes")
            )


# --------------------------------------------------------------------------- optimizer


def _make_optimizer(model: Any, optim: str, tracker: _StorageTracker) -> tuple[Any, int]:
    """The Trainer's optimizer for ``optim``, with its state created by one warm-up update.

    From the second step on, the state lives through every phase; the simulated step is a
    steady-state one. Paged state goes to CUDA managed memory: it is counted apart (its
    tensors stay untracked).
    """
    import torch
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    params = [p for p in model.parameters() if p.requires_grad]
    with unset_fake_temporarily():
        # bitsandbytes builds its quantization maps from Python numbers at construction
        optimizer = _optimizer_for(optim, params)
    for param in params:
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    managed = 0
    paged = stack.OPTIMIZERS[optim].paged
    for param_state in optimizer.state.values():
        for name, value in param_state.items():
            if not isinstance(value, torch.Tensor):
                continue
            if name == "step" and value.dim() == 0 and not _fused(optim):
                continue  # a host scalar for torch's foreach AdamW
            if paged and name.startswith("state") and value.numel() >= BNB_PAGED_MIN_NUMEL:
                managed += value.untyped_storage().nbytes()
                continue
            tracker.track(value, category="optimizer_state", key="optimizer_bytes")
    return optimizer, managed


def _fused(optim: str) -> bool:
    return optim == "adamw_torch_fused"


def _optimizer_for(optim: str, params: list[Any]) -> Any:
    """``transformers.Trainer.get_optimizer_cls_and_kwargs`` for the optimizers the spec allows.

    torch's AdamW defaults to ``foreach`` on CUDA; the fake tensors are on the CPU, so it is
    asked for explicitly. Paged bitsandbytes optimizers are built unpaged (managed memory
    cannot be faked) and their state is counted apart.
    """
    import torch

    lr = 2e-4
    if optim == "adamw_torch":
        return torch.optim.AdamW(params, lr=lr, foreach=True)
    if optim == "adamw_torch_fused":
        return torch.optim.AdamW(params, lr=lr, fused=True)
    if optim == "sgd":
        return torch.optim.SGD(params, lr=lr, foreach=True)
    if optim == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False)  # type: ignore[no-untyped-call]
    bnb: Any = importlib.import_module("bitsandbytes")

    bits = stack.OPTIMIZERS[optim].state_bits
    if "lion" in optim:
        return bnb.optim.Lion(params, lr=lr, optim_bits=bits)
    return bnb.optim.AdamW(params, lr=lr, optim_bits=bits)


# --------------------------------------------------------------------------- CUDA paths


@contextlib.contextmanager
def _gpu_functions() -> Iterator[None]:
    """Functions whose CPU implementation allocates differently from the CUDA one.

    ``F.dropout`` in training: CUDA runs the fused ``native_dropout`` (output plus a bool
    mask, which is what backward keeps); the CPU composite multiplies by a mask of the
    input's dtype, four times larger for fp32 adapters. Replaced at module level, so the
    recomputation of a checkpointed layer (in backward) takes the same path.
    """
    import torch.nn.functional as functional

    original = functional.dropout
    functional.dropout = _native_dropout
    try:
        yield
    finally:
        functional.dropout = original


def _native_dropout(
    input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False
) -> torch.Tensor:
    import torch

    if not training or p == 0.0:
        return input
    output: torch.Tensor = torch.ops.aten.native_dropout.default(input, p, True)[0]
    return output


@contextlib.contextmanager
def _sequences(packed: bool) -> Iterator[None]:
    """Tell transformers whether rows are packed, as real ``position_ids`` would.

    Fake ``position_ids`` cannot be read, so transformers' packed-sequence detection
    assumes packing and builds a block-causal mask. Unpacked rows have none (SDPA runs
    causal, without a mask); packed rows (SFT ``packing``: position ids restart per
    document) do get that mask, as on the GPU.
    """
    import transformers.masking_utils as masking

    original = masking.find_packed_sequence_indices
    if not packed:
        masking.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking.find_packed_sequence_indices = original


# --------------------------------------------------------------------------- fused LM head


@contextlib.contextmanager
def _gpu_lm_head_kernels(tracker: _StorageTracker) -> Iterator[None]:
    """trl's fused LM head as it runs on CUDA.

    The Triton kernels fold each logits tile into fp32 running statistics, and turn it into
    its own gradient, in place; ``_addmm_fp32`` accumulates with ``out_dtype`` into the fp32
    buffer. None of them allocates, so the CPU fallbacks (which do) become no-ops. Only the
    labelled positions are scored (``compact``), as with Triton.
    """
    kernels: Any = importlib.import_module("trl.kernels.chunked_logprob")
    trainer_utils: Any = importlib.import_module("trl.trainer.utils")

    def no_allocation(*args: Any, **kwargs: Any) -> None:
        return None

    original = (
        kernels._forward_tile,
        kernels._backward_tile,
        kernels._addmm_fp32,
        trainer_utils._use_triton,
        kernels.ChunkedLogProbFunction.forward,
        kernels.ChunkedLogProbFunction.backward,
    )
    forward, backward = original[4], original[5]

    def scoped(function: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            tracker.in_lm_head = True
            try:
                return function(*args, **kwargs)
            finally:
                tracker.in_lm_head = False

        return run

    kernels._forward_tile = no_allocation
    kernels._backward_tile = no_allocation
    kernels._addmm_fp32 = no_allocation
    trainer_utils._use_triton = lambda device: True
    kernels.ChunkedLogProbFunction.forward = staticmethod(scoped(forward))
    kernels.ChunkedLogProbFunction.backward = staticmethod(scoped(backward))
    try:
        yield
    finally:
        (
            kernels._forward_tile,
            kernels._backward_tile,
            kernels._addmm_fp32,
            trainer_utils._use_triton,
        ) = original[:4]
        kernels.ChunkedLogProbFunction.forward = staticmethod(forward)
        kernels.ChunkedLogProbFunction.backward = staticmethod(backward)
