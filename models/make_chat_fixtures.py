#!/usr/bin/env python3
"""Expected chat-template renderings, made by transformers' own `apply_chat_template`.

Writes models/chat-templates.json: a few conversations (with and without a system prompt, one
and several turns, add_generation_prompt true and false, and conversations a template refuses)
rendered by transformers for

- the checkpoint template carried by models/tiny-7b-style/tokenizer_config.json (`chat_template`,
  as a real checkpoint carries it; this script also puts it there, see `add_checkpoint_template`,
  which make_fixtures.py calls when it rewrites that directory);
- each family default shipped with the server (src/serve/templates/*.jinja);
- a template that exercises the Python-isms and Jinja features that Hub templates use
  (string methods, namespace, loop variables, tojson, slicing, raise_exception).

The Rust tests render the same conversations with minijinja and compare byte for byte.

Usage (no torch needed):
    python3 -m pip install transformers jinja2 tokenizers
    python3 models/make_chat_fixtures.py
"""

import json
from pathlib import Path

import jinja2
import transformers
from transformers import AutoTokenizer

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TEMPLATES = ROOT / "src" / "serve" / "templates"
OUT = HERE / "chat-templates.json"
CHECKPOINT = "tiny-7b-style"

# A Falcon-style template written the way Hub templates are: Python string methods, a
# raise_exception on a malformed conversation, eos_token after each answer, and block tags on
# their own lines, so that the output depends on trim_blocks / lstrip_blocks exactly as
# transformers sets them.
CHECKPOINT_TEMPLATE = """{% if messages[0]['role'] == 'system' %}
    {% set system_message = messages[0]['content'].strip() %}
    {% set loop_messages = messages[1:] %}
{% else %}
    {% set system_message = '' %}
    {% set loop_messages = messages %}
{% endif %}
{% if system_message %}
{{ 'System: ' + system_message }}
{% endif %}
{% for message in loop_messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if message['role'] == 'user' %}
{{ 'User: ' + message['content'].strip() }}
    {% elif message['role'] == 'assistant' %}
{{ 'Falcon: ' + message['content'].strip() + eos_token }}
    {% else %}
        {{ raise_exception('Unknown role: ' + message['role']) }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
{{ 'Falcon:' }}
{%- endif %}"""

# Features of Jinja and Python that Hub templates rely on, in one template.
FEATURES_TEMPLATE = """{%- set ns = namespace(n_user=0, last_role='') -%}
{%- for message in messages -%}
    {%- if message.role == 'user' %}{% set ns.n_user = ns.n_user + 1 %}{% endif -%}
    {%- set ns.last_role = message.role -%}
    [{{ loop.index }}/{{ loop.length }}{% if loop.first %} first{% endif %}{% if loop.last %} last{% endif %}] {{ message['role'].upper() }} {{ message['role'].title() }} {{ message['role'].capitalize() }}
    {{ message['content'].lstrip().rstrip() | length }} {{ message['content'].replace('o', '0').strip() }}
    {%- if message['content'].strip().startswith('Hel') %} starts{% endif -%}
    {%- if message['content'].strip().endswith('?') %} asks{% endif %}
    {{ message['content'].split() | join('|') }} {{ message['content'].strip()[:3] }} {{ message['content'].strip()[::-1] }}
    {{ message | tojson }} {{ message.get('name', 'anonymous') }} {{ message['content'] | trim | lower }}
{% endfor -%}
users={{ ns.n_user }} last={{ ns.last_role }} total={{ messages | length }} roles={{ messages | map(attribute='role') | join(',') }}
{%- if messages | selectattr('role', 'equalto', 'system') | list | length > 0 %} has-system{% endif %}
{%- if add_generation_prompt is defined and add_generation_prompt %} gen{% endif %}
{{ {'a': 1, 'b': [True, None, 'x"y']} | tojson }} {{ eos_token }}|{{ bos_token }}|
{%- if messages | length > 9 %}{{ raise_exception('too many messages: ' ~ (messages | length)) }}{% endif %}"""

CONVERSATIONS = {
    "one-turn": [
        {"role": "user", "content": "Hello! Who are you?"},
    ],
    "system-one-turn": [
        {"role": "system", "content": "You are a helpful assistant.  "},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    "multi-turn": [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": " Hi! How can I help you today?"},
        {"role": "user", "content": "Tell me about falcons.\n"},
    ],
    "system-multi-turn": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name a bird of prey."},
        {"role": "assistant", "content": "The peregrine falcon."},
        {"role": "user", "content": "How fast does it dive?"},
        {"role": "assistant", "content": "Over 300 km/h."},
    ],
    "unicode-and-spaces": [
        {"role": "user", "content": "  Héllo wörld — 🦅 façade\n\n"},
        {"role": "assistant", "content": "\t“Quoted” 日本語  "},
        {"role": "user", "content": "Done?"},
    ],
    # Refused by the templates that check the conversation's shape.
    "two-users-in-a-row": [
        {"role": "user", "content": "One"},
        {"role": "user", "content": "Two"},
    ],
    "tool-role": [
        {"role": "user", "content": "What is the weather?"},
        {"role": "tool", "content": "sunny"},
    ],
    "late-system": [
        {"role": "user", "content": "Hi"},
        {"role": "system", "content": "Be nice."},
    ],
}


def add_checkpoint_template(directory):
    """Puts CHECKPOINT_TEMPLATE into directory/tokenizer_config.json as `chat_template`."""
    path = Path(directory) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["chat_template"] = CHECKPOINT_TEMPLATE
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def render(tokenizer, template, messages, add_generation_prompt):
    try:
        text = tokenizer.apply_chat_template(
            messages,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
        return {"rendered": text}
    except jinja2.exceptions.TemplateError as e:
        return {"error": str(e)}


def main():
    add_checkpoint_template(HERE / CHECKPOINT)
    tokenizer = AutoTokenizer.from_pretrained(HERE / CHECKPOINT)
    assert tokenizer.chat_template == CHECKPOINT_TEMPLATE, "transformers reads the template back"

    templates = {
        "checkpoint": {
            "source": f"models/{CHECKPOINT}/tokenizer_config.json",
            # None: transformers' own template of the tokenizer, as a client of the checkpoint gets it.
            "text": None,
        },
        "falcon-instruct": {
            "source": "src/serve/templates/falcon-instruct.jinja",
            "text": (TEMPLATES / "falcon-instruct.jinja").read_text(encoding="utf-8"),
        },
        "falcon-180b-chat": {
            "source": "src/serve/templates/falcon-180b-chat.jinja",
            "text": (TEMPLATES / "falcon-180b-chat.jinja").read_text(encoding="utf-8"),
        },
        "features": {
            "source": "models/make_chat_fixtures.py (FEATURES_TEMPLATE)",
            "text": FEATURES_TEMPLATE,
        },
    }

    cases = []
    for name, t in templates.items():
        for conv, messages in CONVERSATIONS.items():
            for agp in (True, False):
                case = {
                    "template": name,
                    "conversation": conv,
                    "add_generation_prompt": agp,
                    "messages": messages,
                }
                case.update(render(tokenizer, t["text"], messages, agp))
                cases.append(case)

    out = {
        "note": "made by models/make_chat_fixtures.py with transformers' apply_chat_template",
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "templates": {name: {"source": t["source"]} for name, t in templates.items()},
        "features_template": FEATURES_TEMPLATE,
        "cases": cases,
        "transformers_version": transformers.__version__,
        "jinja2_version": jinja2.__version__,
    }
    OUT.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    n_err = sum("error" in c for c in cases)
    print(f"{OUT.relative_to(ROOT)}: {len(cases)} renderings ({n_err} refused)")


if __name__ == "__main__":
    main()
