"""Tokenize rows exactly as the generated trl 1.16 script will, and say which tokens train.

This mirrors ``SFTTrainer._prepare_dataset`` / ``DPOTrainer._prepare_dataset`` with the
settings peftgen's scripts use (trl defaults: ``assistant_only_loss=False``,
``completion_only_loss=None``, ``truncation_mode="keep_start"``):

- ``messages``: ``apply_chat_template(messages)``; every token is trained.
- ``text``: the eos token is appended unless present, then plain tokenization; every
  token is trained.
- ``prompt_completion``: prompt and prompt+completion are tokenized (with the chat
  template and ``add_generation_prompt=True`` for the prompt when conversational, with
  eos appended to a plain completion); the completion starts where the two diverge
  (``common_prefix_length``) and only completion tokens are trained.
- ``preference`` (DPO): prompt+chosen and prompt+rejected, each truncated on its own;
  the row's length is the longer of the two; the chosen sequence is the one shown.
- ``prompt`` (GRPO): the prompt only (the generation prompt added after a user turn);
  nothing in it is trained, the completion is generated at run time.
  For ``messages`` the prompt is the conversation without a final assistant turn, as
  the GRPO script maps it.

transformers is imported here only (``peftgen[train]``); the rest of check-data runs
without it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftgen.check_data.rows import split_implicit_prompt
from peftgen.errors import UserError
from peftgen.hub import TRANSFORMERS_OFFLINE_FLAGS, hub_offline


@dataclass(frozen=True)
class TokenizedRow:
    input_ids: list[int]
    trained_mask: list[bool]
    """True where the token's label is kept (it contributes to the loss)."""
    sequence_length: int
    """Tokens the trainer sees for the row: ``len(input_ids)``, for DPO the longer of the
    chosen and rejected sequences."""


@dataclass(frozen=True)
class LoadedTokenizer:
    tokenizer: Any
    """A transformers tokenizer (typed loosely: transformers is an optional extra)."""
    source: str
    """Where it came from: a folder, or a hub id."""
    max_position_embeddings: int | None
    """The model's context length from its config.json, when known."""


class TokenizerUnavailable(Exception):
    """Token statistics cannot be computed; the message says why (shown, not fatal)."""


def load_tokenizer(
    model_id: str,
    revision: str | None,
    override_dir: Path | None,
    trust_remote_code: bool,
    chat_template: str | None,
) -> LoadedTokenizer:
    """The tokenizer of ``--tokenizer DIR``, else ``model.id``'s: a local folder, or the hub.

    With ``dataset.chat_template`` set it is changed the way the generated script changes
    it, so lengths count the template's markers as the single tokens they become.
    """
    if override_dir is not None and not override_dir.is_dir():
        raise UserError.single(
            "not a folder; --tokenizer needs the folder holding the tokenizer files",
            file=str(override_dir),
        )
    folder = override_dir if override_dir is not None else Path(model_id)
    try:
        is_local = folder.is_dir()
    except OSError:  # a name too long for the file system names no folder
        is_local = False
    if not is_local and hub_offline(TRANSFORMERS_OFFLINE_FLAGS):
        raise TokenizerUnavailable(
            f"model.id {model_id!r} is not a local folder and the hub is offline"
        )
    source = str(folder) if is_local else _hub_id(model_id)
    if not is_local:
        from peftgen.hub import hub_unreachable

        unreachable = hub_unreachable()
        if unreachable is not None:
            raise TokenizerUnavailable(
                f"model.id {model_id!r} is not a local folder and the hub cannot be reached "
                f"({unreachable})"
            )
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise TokenizerUnavailable(
            "token statistics need transformers: pip install 'peftgen[train]'"
        ) from None
    from peftgen.hub import quick_timeouts

    try:
        with quick_timeouts():
            tokenizer = AutoTokenizer.from_pretrained(
                source,
                revision=None if is_local else revision,
                trust_remote_code=trust_remote_code,
            )
    except Exception as error:  # network, missing files, a catalogue alias that is no hub id
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        if override_dir is not None:  # the user named this folder: their mistake, not a skip
            files = ("tokenizer.json", "tokenizer_config.json")
            why = (
                f": {first_line}"
                if any((override_dir / name).is_file() for name in files)
                else f" (it holds no {' or '.join(files)})"
            )
            raise UserError.single(
                f"no tokenizer loads from this folder{why}",
                file=str(override_dir),
                hint="give the model's folder, or one tokenizer.save_pretrained wrote",
            ) from None
        raise TokenizerUnavailable(
            f"cannot load the tokenizer from {source!r}: {first_line}"
        ) from None
    if chat_template == "chatml":
        _install_chatml(tokenizer)
    return LoadedTokenizer(tokenizer, source, _max_positions(folder) if is_local else None)


def _hub_id(model_id: str) -> str:
    """The hub id behind a catalogue alias (``llama3-8b``); other ids as written."""
    from peftgen.catalog import find_model

    arch = find_model(model_id)
    return arch.id if arch is not None else model_id


def _install_chatml(tokenizer: Any) -> None:
    """What ``train.py`` does when the spec names ``chatml`` (templates/train_base.py.j2)."""
    from peftgen.chat_templates import CHATML, CHATML_SPECIAL_TOKENS

    tokenizer.add_special_tokens(
        {"extra_special_tokens": list(CHATML_SPECIAL_TOKENS)}, replace_extra_special_tokens=False
    )
    tokenizer.chat_template = CHATML.training
    tokenizer.eos_token = CHATML_SPECIAL_TOKENS[1]


def _max_positions(folder: Path) -> int | None:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings") if isinstance(config, dict) else None
    return value if isinstance(value, int) and value > 0 else None


def needs_chat_template(shape: str) -> bool:
    return shape.startswith("conversational")


class RowTokenizer:
    """Tokenizes rows of one shape for one method/format, as the trainer will.

    ``loss_on`` is the spec's resolved ``training.loss_on`` (SFT): ``assistant`` keeps only
    the assistant turns of ``messages`` (trl's ``assistant_only_loss`` through the training
    chat template), ``all`` every token. With a chat template, plain-string prompt /
    completion / preference rows become user and assistant turns, as the script's
    ``as_conversation`` makes them.
    """

    def __init__(self, tokenizer: Any, method: str, data_format: str, loss_on: str = "all") -> None:
        self.tokenizer = tokenizer
        self.method = method
        self.data_format = data_format
        self.loss_on = loss_on
        self.eos_token: str = tokenizer.eos_token or ""
        self.convert_rows = bool(tokenizer.chat_template) and data_format in (
            "prompt_completion",
            "preference",
            "prompt",
        )
        self.training_template: str | None = None
        assistant_only = method == "sft" and data_format == "messages" and loss_on == "assistant"
        if assistant_only and tokenizer.chat_template:
            self.training_template = training_chat_template(tokenizer)

    def tokenize(self, record: dict[str, Any], shape: str) -> TokenizedRow:
        conversational = needs_chat_template(shape)
        if self.convert_rows and not conversational:
            record, conversational = as_conversation(record), True
            shape = "conversational " + shape
        if self.data_format == "text":
            return _all_trained(self._text_ids(_with_eos(record["text"], self.eos_token)))
        if self.data_format == "messages" and self.method == "sft":
            if self.loss_on == "assistant":
                return self._assistant_turns(record)
            return _all_trained(self._chat_ids(record["messages"], record))
        if self.data_format == "prompt_completion":
            if self.loss_on == "all":
                return _all_trained(self._prompt_completion(record, conversational).input_ids)
            return self._prompt_completion(record, conversational)
        if self.data_format == "preference":
            return self._preference(record, shape)
        if self.data_format == "messages":
            # The GRPO script's `conversation_prompt`: a final assistant turn is the
            # reference answer, not part of the prompt.
            messages = record["messages"]
            prompt = messages[:-1] if messages[-1]["role"] == "assistant" else messages
        else:
            prompt = record["prompt"]
        return self._prompt_only(prompt, record)

    def _assistant_turns(self, record: dict[str, Any]) -> TokenizedRow:
        tools = record.get("tools")
        result = self.tokenizer.apply_chat_template(
            record["messages"],
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            chat_template=self.training_template,
            tools=json.loads(tools) if isinstance(tools, str) else tools,
            **record.get("chat_template_kwargs", {}),
        )
        ids = list(result["input_ids"])
        mask = [bool(flag) for flag in result["assistant_masks"]]
        return TokenizedRow(ids, mask, len(ids))

    def _text_ids(self, text: str) -> list[int]:
        ids: list[int] = self.tokenizer(text=text)["input_ids"]
        return ids

    def _chat_ids(self, messages: list[Any], record: dict[str, Any], **kwargs: Any) -> list[int]:
        tools = record.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        result = self.tokenizer.apply_chat_template(
            messages,
            tokenize=True,
            return_dict=True,
            tools=tools,
            **record.get("chat_template_kwargs", {}),
            **kwargs,
        )
        ids: list[int] = list(result["input_ids"])
        return ids

    def _prompt_completion(self, record: dict[str, Any], conversational: bool) -> TokenizedRow:
        if conversational:
            prompt_ids = self._chat_ids(record["prompt"], record, add_generation_prompt=True)
            full_ids = self._chat_ids(record["prompt"] + record["completion"], record)
        else:
            completion = _with_eos(record["completion"], self.eos_token)
            prompt_ids = self._text_ids(record["prompt"])
            full_ids = self._text_ids(record["prompt"] + completion)
        prompt_length = common_prefix_length(prompt_ids, full_ids)
        mask = [index >= prompt_length for index in range(len(full_ids))]
        return TokenizedRow(full_ids, mask, len(full_ids))

    def _preference(self, record: dict[str, Any], shape: str) -> TokenizedRow:
        """The chosen sequence; its length is the longer of the chosen and rejected ones."""
        if "prompt" in record:
            prompt, chosen, rejected = record["prompt"], record["chosen"], record["rejected"]
        else:
            prompt, chosen, rejected = split_implicit_prompt(record["chosen"], record["rejected"])
        if needs_chat_template(shape):
            prompt_ids = self._chat_ids(prompt, record, add_generation_prompt=True)
            chosen_ids = self._chat_ids(prompt + chosen, record)
            rejected_ids = self._chat_ids(prompt + rejected, record)
        else:
            prompt_ids = self._text_ids(prompt)
            chosen_ids = self._text_ids(prompt + _with_eos(chosen, self.eos_token))
            rejected_ids = self._text_ids(prompt + _with_eos(rejected, self.eos_token))
        prompt_length = min(
            common_prefix_length(prompt_ids, chosen_ids),
            common_prefix_length(prompt_ids, rejected_ids),
        )
        mask = [index >= prompt_length for index in range(len(chosen_ids))]
        return TokenizedRow(chosen_ids, mask, max(len(chosen_ids), len(rejected_ids)))

    def _prompt_only(self, prompt: Any, record: dict[str, Any]) -> TokenizedRow:
        if isinstance(prompt, str):
            ids = self._text_ids(prompt)
        elif prompt[-1]["role"] == "assistant":
            ids = self._chat_ids(prompt, record, continue_final_message=True)
        else:
            ids = self._chat_ids(prompt, record, add_generation_prompt=True)
        return TokenizedRow(ids, [False] * len(ids), len(ids))


def as_conversation(record: dict[str, Any]) -> dict[str, Any]:
    """The generated script's ``as_conversation``: plain strings as user / assistant turns."""
    converted = dict(record)
    for key, role in (
        ("prompt", "user"),
        ("completion", "assistant"),
        ("chosen", "assistant"),
        ("rejected", "assistant"),
    ):
        if isinstance(record.get(key), str):
            converted[key] = [{"role": role, "content": record[key]}]
    return converted


def training_chat_template(tokenizer: Any) -> str | None:
    """The template trl tokenizes with under ``assistant_only_loss``: the tokenizer's own when
    it has ``{% generation %}`` markers, peftgen's marked copy of a family it ships (the
    script installs it), else trl's own (``get_training_chat_template``)."""
    from peftgen.chat_templates import has_generation_markers, identify

    template = tokenizer.chat_template
    if isinstance(template, str) and has_generation_markers(template):
        return None
    family = identify(template)
    if family is not None and family.training is not None:
        return family.training
    from trl.chat_template_utils import get_training_chat_template

    try:
        patched: str | None = get_training_chat_template(tokenizer)
    except ValueError:
        raise UserError.single(
            "loss on the assistant turns needs to find them in the chat template, and neither "
            "trl nor peftgen knows this tokenizer's template; set training.loss_on: all",
            field_path="training.loss_on",
        ) from None
    return patched


def common_prefix_length(ids: list[int], other_ids: list[int]) -> int:
    """trl 1.16's ``common_prefix_length``: leading tokens the two sequences share."""
    length = 0
    for token, other in zip(ids, other_ids, strict=False):
        if token != other:
            break
        length += 1
    return length


def _with_eos(text: str, eos_token: str) -> str:
    return text if not eos_token or text.endswith(eos_token) else text + eos_token


def _all_trained(ids: list[int]) -> TokenizedRow:
    return TokenizedRow(ids, [True] * len(ids), len(ids))


@dataclass(frozen=True)
class RenderedSpan:
    text: str
    trained: bool


def render_spans(tokenizer: Any, row: TokenizedRow) -> list[RenderedSpan]:
    """The example's text split where training switches on or off."""
    spans: list[RenderedSpan] = []
    start = 0
    for index in range(1, len(row.input_ids) + 1):
        if index == len(row.input_ids) or row.trained_mask[index] != row.trained_mask[start]:
            text = tokenizer.decode(row.input_ids[start:index], skip_special_tokens=False)
            spans.append(RenderedSpan(text, row.trained_mask[start]))
            start = index
    return spans
