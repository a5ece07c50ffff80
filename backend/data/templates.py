"""Prompt templates: how a conversation turn becomes text around the model's answer.

The records carry XTuner 0.2's field names and values (SYSTEM, INSTRUCTION,
SUFFIX, SUFFIX_AS_EOS, SEP, STOP_WORDS) so a config written for XTuner picks the
same strings here. Two entries are ours:

- ``none``: no template at all, the map_fn's text is used as is (XTuner's
  ``template_map_fn=None``, what pretraining configs use);
- ``hf_chat_template``: render with the tokenizer's own ``chat_template``
  (for models XTuner never listed), training only the assistant's part.

Each turn renders as  [SYSTEM] INSTRUCTION | output SUFFIX [EOS] | SEP
where only the middle part carries loss (see ``backend.data.encode``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import DataError

# a template's turn markers: <|im_end|>, <｜end▁of▁sentence｜>, <eoa>, <start_of_turn>
_MARKER = re.compile(r"<\|[^<>|\s]+\|>|<｜[^<>｜]+｜>|</?[A-Za-z_]\w*>")


@dataclass(frozen=True)
class Template:
    """One prompt template. Attribute names are XTuner's, so that code written
    against ``PROMPT_TEMPLATE.x.INSTRUCTION`` reads the same here."""

    name: str
    INSTRUCTION: str = "{input}"
    SYSTEM: str | None = None
    SUFFIX: str = ""
    SUFFIX_AS_EOS: bool = False
    SEP: str = ""
    STOP_WORDS: tuple[str, ...] = ()
    description: str = ""
    # True only for ``hf_chat_template``: rendering is delegated to the tokenizer.
    uses_tokenizer_chat_template: bool = False
    # True only for ``none``: turns keep their own need_eos_token / sep flags.
    raw: bool = False
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def get(self, key: str, default=None):
        """dict-style access, as XTuner's ConfigDict allows (``template.get('SUFFIX')``)."""
        return getattr(self, key, default)

    def format_input(self, text: str | None, system: str | None, round_: int) -> str:
        """The prompt part of one turn (never trained): [SYSTEM] + INSTRUCTION."""
        text = "" if text is None else text
        if self.raw:
            return text
        rendered = self.INSTRUCTION.format(input=text, round=round_)
        if system:
            if self.SYSTEM is None:
                raise DataError(
                    f"template {self.name!r} has no SYSTEM slot, but the conversation "
                    f"has a system text ({system[:40]!r}...). Pick a template with a "
                    "system slot, or a map_fn that puts no system text."
                )
            rendered = self.SYSTEM.format(system=system) + rendered
        return rendered

    def markers(self) -> list[str]:
        """The markers this format needs as single tokens: its end-of-turn markers
        (SUFFIX, STOP_WORDS) and every marker spelled in their style. XTuner's
        plain-text markers (``<|User|>:`` in ``default``, ``<|Human|>`` beside
        ``<eoh>``) are text to every tokenizer and are not listed."""
        if self.raw or self.uses_tokenizer_chat_template:
            return []
        ends = _MARKER.findall(" ".join([self.SUFFIX, *self.STOP_WORDS]))
        styles = {_style(m) for m in ends}
        texts = [self.SYSTEM or "", self.INSTRUCTION, self.SUFFIX, self.SEP, *self.STOP_WORDS]
        found = [m for m in _MARKER.findall(" ".join(texts)) if _style(m) in styles]
        return list(dict.fromkeys(found))

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "SYSTEM": self.SYSTEM,
            "INSTRUCTION": self.INSTRUCTION,
            "SUFFIX": self.SUFFIX,
            "SUFFIX_AS_EOS": self.SUFFIX_AS_EOS,
            "SEP": self.SEP,
            "STOP_WORDS": list(self.STOP_WORDS),
        }


def _style(marker: str) -> str:
    return "bar" if marker.startswith("<|") else "wide" if marker.startswith("<｜") else "angle"


TEMPLATES: dict[str, Template] = {}


def register_template(template: Template) -> Template:
    if template.name in TEMPLATES:
        raise ValueError(f"template {template.name!r} is registered twice")
    TEMPLATES[template.name] = template
    return template


def get_template(name_or_template: str | Template) -> Template:
    """A template by XTuner name (``internlm2_chat``), or the object itself."""
    if isinstance(name_or_template, Template):
        return name_or_template
    if name_or_template is None:
        return TEMPLATES["none"]
    key = str(name_or_template).strip()
    if key in TEMPLATES:
        return TEMPLATES[key]
    import difflib

    close = difflib.get_close_matches(key, TEMPLATES, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise DataError(
        f"unknown prompt template {key!r}.{hint} Known templates: {', '.join(sorted(TEMPLATES))}"
    )


def _t(name, description, **fields):
    if "STOP_WORDS" in fields:
        fields["STOP_WORDS"] = tuple(fields["STOP_WORDS"])
    return register_template(Template(name=name, description=description, **fields))


_IM_SYSTEM = "<|im_start|>system\n{system}<|im_end|>\n"
_IM_INSTRUCTION = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"
_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's "
    "questions. {system}\n "
)
_DEEPSEEK_CODER_SYSTEM = (
    "You are an AI programming assistant, utilizing the DeepSeek Coder model, "
    "developed by DeepSeekCompany, and you only answer questions related to "
    "computer science. For politically sensitive questions, security and "
    "privacy issues, and other non-computer science questions, you will refuse "
    "to answer. {system}\n"
)
_MISTRAL = dict(SYSTEM="[INST] {system} [/INST]\n", INSTRUCTION="[INST] {input} [/INST]", SEP="\n")

# The XTuner 0.2 PROMPT_TEMPLATE entries, field for field.
_t("default", "XTuner's default <|User|>/<|Bot|> format",
   SYSTEM="<|System|>:{system}\n", INSTRUCTION="<|User|>:{input}\n<|Bot|>:", SEP="\n")
_t("zephyr", "Zephyr <|user|>/<|assistant|>",
   SYSTEM="<|system|>\n{system}\n", INSTRUCTION="<|user|>\n{input}\n<|assistant|>\n", SEP="\n")
_t("internlm_chat", "InternLM (v1) chat, <eoh>/<eoa>",
   SYSTEM="<|System|>:{system}\n", INSTRUCTION="<|User|>:{input}<eoh>\n<|Bot|>:",
   SUFFIX="<eoa>", SUFFIX_AS_EOS=True, SEP="\n", STOP_WORDS=["<eoa>"])
_t("internlm2_chat", "InternLM2 chat (ChatML)",
   SYSTEM=_IM_SYSTEM, INSTRUCTION=_IM_INSTRUCTION,
   SUFFIX="<|im_end|>", SUFFIX_AS_EOS=True, SEP="\n", STOP_WORDS=["<|im_end|>"])
_t("moss_sft", "MOSS SFT <|Human|> format",
   SYSTEM="{system}\n", INSTRUCTION="<|Human|>: {input}<eoh>\n", SEP="\n",
   STOP_WORDS=["<eoc>", "<eom>"])
_t("llama2_chat", "Llama-2 chat [INST] with the stock system prompt",
   SYSTEM=(
       "[INST] <<SYS>>\n You are a helpful, respectful and honest assistant. "
       "Always answer as helpfully as possible, while being safe. Your answers "
       "should not include any harmful, unethical, racist, sexist, toxic, "
       "dangerous, or illegal content. Please ensure that your responses are "
       "socially unbiased and positive in nature.\n{system}\n<</SYS>>\n [/INST] "
   ),
   INSTRUCTION="[INST] {input} [/INST]", SEP="\n")
_t("code_llama_chat", "Code Llama instruct [INST]",
   SYSTEM="{system}\n", INSTRUCTION="[INST] {input} [/INST]")
_t("chatglm2", "ChatGLM2 [Round n] 问/答",
   SYSTEM="{system}\n", INSTRUCTION="[Round {round}]\n\n问：{input}\n\n答：", SEP="\n\n")
_t("chatglm3", "ChatGLM3 <|user|>/<|assistant|>",
   SYSTEM="<|system|>\n{system}", INSTRUCTION="<|user|>\n{input}<|assistant|>\n", SEP="\n")
_t("qwen_chat", "Qwen / Qwen2 / Qwen2.5 chat (ChatML)",
   SYSTEM=_IM_SYSTEM, INSTRUCTION=_IM_INSTRUCTION,
   SUFFIX="<|im_end|>", SUFFIX_AS_EOS=True, SEP="\n", STOP_WORDS=["<|im_end|>", "<|endoftext|>"])
_t("baichuan_chat", "Baichuan chat",
   SYSTEM="{system}\n", INSTRUCTION="<reserved_102>{input}<reserved_103>", SEP="\n")
_t("baichuan2_chat", "Baichuan2 chat",
   SYSTEM="{system}\n", INSTRUCTION="<reserved_106>{input}<reserved_107>", SEP="\n")
_t("wizardlm", "WizardLM USER:/ASSISTANT:",
   SYSTEM=_VICUNA_SYSTEM, INSTRUCTION="USER: {input} ASSISTANT:", SEP="\n")
_t("wizardcoder", "WizardCoder ### Instruction/### Response",
   SYSTEM=(
       "Below is an instruction that describes a task. Write a response that "
       "appropriately completes the request.\n\n{system}\n "
   ),
   INSTRUCTION="### Instruction:\n{input}\n\n### Response:", SEP="\n\n")
_t("vicuna", "Vicuna USER:/ASSISTANT:",
   SYSTEM=_VICUNA_SYSTEM, INSTRUCTION="USER: {input} ASSISTANT:", SEP="\n")
_t("deepseek_coder", "DeepSeek Coder instruct",
   SYSTEM=_DEEPSEEK_CODER_SYSTEM, INSTRUCTION="### Instruction:\n{input}\n### Response:\n", SEP="\n")
_t("deepseekcoder", "DeepSeek Coder instruct (old XTuner name of deepseek_coder)",
   SYSTEM=_DEEPSEEK_CODER_SYSTEM, INSTRUCTION="### Instruction:\n{input}\n### Response:\n", SEP="\n")
_t("deepseek_moe", "DeepSeek MoE chat [INST]", **_MISTRAL)
_t("deepseek_v2", "DeepSeek-V2 chat User:/Assistant:",
   SYSTEM="{system}\n\n", INSTRUCTION="User: {input}\n\nAssistant: ",
   SUFFIX="<｜end▁of▁sentence｜>", SUFFIX_AS_EOS=True, STOP_WORDS=["<｜end▁of▁sentence｜>"])
_t("mistral", "Mistral instruct [INST]", **_MISTRAL)
_t("mixtral", "Mixtral instruct [INST]", **_MISTRAL)
_t("minicpm", "MiniCPM <用户>/<AI> (no system slot)",
   INSTRUCTION="<用户> {input} <AI>", SEP="\n")
_t("minicpm3", "MiniCPM3 chat (ChatML)",
   SYSTEM=_IM_SYSTEM, INSTRUCTION=_IM_INSTRUCTION,
   SUFFIX="<|im_end|>", SUFFIX_AS_EOS=True, SEP="\n", STOP_WORDS=["<|im_end|>", "<|endoftext|>"])
_t("gemma", "Gemma <start_of_turn>user/model",
   SYSTEM="<start_of_turn>system\n{system}<end_of_turn>\n",
   INSTRUCTION="<start_of_turn>user\n{input}<end_of_turn>\n<start_of_turn>model\n",
   SUFFIX="<end_of_turn>", SUFFIX_AS_EOS=False, SEP="\n", STOP_WORDS=["<end_of_turn>"])
_t("cohere_chat", "Cohere Command-R chat",
   SYSTEM="<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{system}<|END_OF_TURN_TOKEN|>",
   INSTRUCTION=(
       "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{input}<|END_OF_TURN_TOKEN|>"
       "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
   ),
   SUFFIX="<|END_OF_TURN_TOKEN|>", SUFFIX_AS_EOS=True, STOP_WORDS=["<|END_OF_TURN_TOKEN|>"])
_t("llama3_chat", "Llama-3 / 3.1 instruct headers",
   SYSTEM="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
   INSTRUCTION=(
       "<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|>"
       "<|start_header_id|>assistant<|end_header_id|>\n\n"
   ),
   SUFFIX="<|eot_id|>", SUFFIX_AS_EOS=True, STOP_WORDS=["<|eot_id|>"])
_t("phi3_chat", "Phi-3 <|user|>/<|assistant|>",
   SYSTEM="<|system|>\n{system}<|end|>\n", INSTRUCTION="<|user|>\n{input}<|end|>\n<|assistant|>\n",
   SUFFIX="<|end|>", SUFFIX_AS_EOS=True, SEP="\n", STOP_WORDS=["<|end|>"])

# Ours.
_t("none", "no template: the map_fn's text as is (pretraining on plain text)", raw=True)
_t("hf_chat_template", "the tokenizer's own chat_template; loss on assistant turns only",
   uses_tokenizer_chat_template=True)


# XTuner's SYSTEM_TEMPLATE texts, used by the map_fns that set a system prompt.
class SYSTEM_TEMPLATE:  # noqa: N801 - XTuner's spelling, so `SYSTEM_TEMPLATE.coder` reads the same
    moss_sft = (
        "You are an AI assistant whose name is {bot_name}.\n"
        "Capabilities and tools that {bot_name} can possess.\n"
        "- Inner thoughts: enabled.\n"
        "- Web search: enabled. API: Search(query)\n"
        "- Calculator: enabled. API: Calculate(expression)\n"
        "- Equation solver: enabled. API: Solve(equation)\n"
        "- Text-to-image: disabled.\n"
        "- Image edition: disabled.\n"
        "- Text-to-speech: disabled.\n"
    )
    alpaca = (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n"
    )
    arxiv_gentile = (
        "If you are an expert in writing papers, please generate a good paper "
        "title for this paper based on other authors' descriptions of their abstracts.\n"
    )
    colorist = (
        "You are a professional color designer. Please provide the corresponding "
        "colors based on the description of Human.\n"
    )
    coder = (
        "You are a professional programer. Please provide the corresponding code "
        "based on the description of Human.\n"
    )
    lawyer = "你现在是一名专业的中国律师，请根据用户的问题给出准确、有理有据的回复。\n"
    medical = "如果你是一名医生，请根据患者的描述回答医学问题。\n"
    sql = (
        "If you are an expert in SQL, please generate a good SQL Query for "
        "Question based on the CREATE TABLE statement.\n"
    )

    @classmethod
    def names(cls) -> list[str]:
        return [k for k, v in vars(cls).items() if isinstance(v, str) and not k.startswith("_")]
