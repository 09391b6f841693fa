"""Tokenizer folders built in the tests (no network): a small byte-level BPE `tokenizer.json`
trained with the `tokenizers` library, with added special tokens and no BOS, and chat
templates written in the styles of real checkpoints (transformers is the oracle)."""

import json
import os

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata")
STORIES_TOKENIZER = os.path.join(DIR, "stories260k", "tokenizer")  # tokenizer.json + config.

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<bos>", "<eos>",
            "<start_of_turn>", "<end_of_turn>", "<s>", "</s>"]

CORPUS = [
    "The quick brown fox jumps over the lazy dog. ",
    "Hello there, how are you today? I am fine, thank you!",
    "user assistant system model Human Assistant [INST] [/INST] helpful answer question",
    "naïve café — 日本語のテキスト, emoji 👍🏽 🎉 and numbers 3.14159 2026",
    "    indented code\n\tdef f(x):\n\t\treturn x * 2\n\n\n",
]

# Six templates in the styles of real checkpoints' tokenizer_config.json chat_template.
CHATML = (  # ChatML as Qwen 2.5 / OpenHermes write it.
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = (  # Llama 3 Instruct: BOS from the template, headers, <|eot_id|>.
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
GEMMA = (  # Gemma 3: the system text folded into the first user turn, role "model".
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {{- message['content'] | trim -}}\n    {{- '<end_of_turn>\n' -}}\n{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n")
MISTRAL = (  # Mistral v0.3: [INST] ... [/INST], the system text before the first user turn.
    "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n{%- else %}\n"
    "    {%- set loop_messages = messages %}\n{%- endif %}\n\n{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation roles must "
    "alternate user/assistant/user/assistant/...') }}\n    {%- endif %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.first and system_message is defined %}\n"
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
    "        {%- else %}\n            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
    "        {%- endif %}\n    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content']|trim + eos_token}}\n    {%- else %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported, with the "
    "exception of an initial optional system message!') }}\n    {%- endif %}\n{%- endfor %}\n")
SYSTEM_DEFAULT = (  # Qwen 2.5: a default system prompt when the conversation has none.
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are "
    "a helpful assistant.<|im_end|>\\n' }}\n{%- endif %}\n{%- for message in messages %}\n"
    "    {%- if not (message.role == 'system' and loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n")
TOJSON = (  # A tools-style template: content through transformers' tojson (no HTML escaping).
    "{%- for message in messages %}{{ '<|im_start|>' + message.role + '\n' }}"
    "{%- if message.role == 'user' %}{{ {'query': message.content, 'n': loop.index0} | tojson }}"
    "{%- else %}{{ message.content }}{%- endif %}{{ '<|im_end|>\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}")

# name: (template, bos_token, eos_token, generation_config eos ids as tokens).
STYLES = {
    "chatml": (CHATML, None, "<|im_end|>", ["<|im_end|>", "<|endoftext|>"]),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", ["<|eot_id|>"]),
    "gemma": (GEMMA, "<bos>", "<eos>", ["<eos>", "<end_of_turn>"]),
    "mistral": (MISTRAL, "<s>", "</s>", ["</s>"]),
    "system_default": (SYSTEM_DEFAULT, None, "<|im_end|>", ["<|im_end|>"]),
    "tojson": (TOJSON, None, "<|im_end|>", ["<|im_end|>"]),
}


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def train_bpe(vocab_size: int = 400) -> tokenizers.Tokenizer:
  """A byte-level BPE (GPT-2 / Llama 3 / Qwen style) with SPECIALS as added tokens."""
  tk = tokenizers.Tokenizer(models.BPE())
  tk.pre_tokenizer = pre_tokenizers.Sequence([  # As Llama 3's and Qwen 2's tokenizer.json.
      pre_tokenizers.Split(tokenizers.Regex(LLAMA3_SPLIT), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tk.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tk.train_from_iterator(CORPUS * 4, trainer)
  return tk


def write_folder(folder: str, tk: tokenizers.Tokenizer, style: str | None = None,
                 bos: str | None = None, eos: str = "<|endoftext|>", stops=()) -> str:
  """tokenizer.json, tokenizer_config.json (+ generation_config.json) as a checkpoint has."""
  template = None
  if style is not None:
    template, bos, eos, stops = STYLES[style]
  os.makedirs(folder, exist_ok=True)
  tk.save(os.path.join(folder, "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
            "pad_token": None, "clean_up_tokenization_spaces": False}
  if template is not None:
    config["chat_template"] = template
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)
  if stops:
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
      json.dump({"eos_token_id": [tk.token_to_id(t) for t in stops]}, f)
  return folder


CONVERSATIONS = {  # Prompt messages; the final assistant turn is added by each test.
    "single": [{"role": "user", "content": "Hello there, how are you?"}],
    "single_system": [{"role": "system", "content": "You are a helpful assistant."},
                      {"role": "user", "content": "What is 3.14159 — π? 👍🏽"}],
    "multi": [{"role": "user", "content": "Hi!"},
              {"role": "assistant", "content": "Hello! How can I help?"},
              {"role": "user", "content": "Tell me a   story.\n\nPlease."}],
    "multi_system": [{"role": "system", "content": "Answer briefly."},
                     {"role": "user", "content": "naïve café?"},
                     {"role": "assistant", "content": "A café, naïvely."},
                     {"role": "user", "content": "日本語 then 🎉"}],
}
