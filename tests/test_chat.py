"""Chat format: identical to transformers' apply_chat_template with the official Gemma 3 template,
exactly one <bos> after tokenization, and clear errors for conversations Gemma cannot represent."""

from __future__ import annotations

import pytest

from gemmaforge.chat import encode_chat, format_chat
from gemmaforge.errors import GemmaforgeError

# The chat template of google/gemma-3-*-it (tokenizer_config.json). The embedded GGUF carries none.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)

U = "user"
A = "assistant"

CONVERSATIONS = {
    "one user turn": [{"role": U, "content": "Hello!"}],
    "multi-turn": [
        {"role": U, "content": "What is 2+2?"},
        {"role": A, "content": "4."},
        {"role": U, "content": "And 3+3?"},
    ],
    "ends with the model": [{"role": U, "content": "Hi"}, {"role": A, "content": "Hello! How can I help?"}],
    "system prompt": [{"role": "system", "content": "You are terse."}, {"role": U, "content": "Explain RoPE."}],
    "system prompt, multi-turn": [
        {"role": "system", "content": "  Answer in French.\n"},
        {"role": U, "content": "Good morning"},
        {"role": A, "content": "Bonjour"},
        {"role": U, "content": "Thanks"},
    ],
    "whitespace is trimmed": [{"role": U, "content": "\n\n  padded question \t\n"}, {"role": A, "content": " ok "}],
    "unicode and code": [{"role": U, "content": "Übersetze: 你好 👋\n```py\nprint(1)\n```"}],
    "text parts": [{"role": U, "content": [{"type": "text", "text": " part one "}, {"type": "text", "text": "two"}]}],
    "empty message": [{"role": U, "content": ""}],
}


@pytest.fixture(scope="module")
def reference():
    """transformers' own renderer, given the official template (any tokenizer will do for rendering)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"<bos>": 0, "<unk>": 1}, unk_token="<unk>")), bos_token="<bos>"
    )

    def render(messages, add_generation_prompt=True):
        return hf.apply_chat_template(
            messages, chat_template=GEMMA3_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    return render


@pytest.fixture(scope="module")
def tok(embedded_gguf):
    from gemmaforge.tokenizer import load_tokenizer

    return load_tokenizer(embedded_gguf)


def test_the_documented_layout():
    messages = [{"role": U, "content": "Hi"}, {"role": A, "content": "Hello"}, {"role": U, "content": "Bye"}]
    assert format_chat(messages) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    )
    assert format_chat(messages, add_generation_prompt=False).endswith("Bye<end_of_turn>\n")


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_official_template(reference, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    assert format_chat(messages, add_generation_prompt) == reference(messages, add_generation_prompt)


def test_system_text_goes_into_the_first_user_turn():
    text = format_chat([{"role": "system", "content": "Be brief."}, {"role": U, "content": "Why?"}])
    assert text == "<bos><start_of_turn>user\nBe brief.\n\nWhy?<end_of_turn>\n<start_of_turn>model\n"


def test_encode_chat_has_exactly_one_bos(tok):
    messages = CONVERSATIONS["system prompt, multi-turn"]
    ids = encode_chat(tok, messages)
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
    assert ids[1] == tok.start_of_turn_id
    assert ids.count(tok.start_of_turn_id) == 4 and ids.count(tok.end_of_turn_id) == 3
    assert ids[-3:] == tok.encode("<start_of_turn>model\n", add_bos=False)
    assert tok.decode(ids) == format_chat(messages)
    # the mistake encode_chat exists to prevent
    assert tok.encode(format_chat(messages))[:2] == [tok.bos_id, tok.bos_id]


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": U, "content": "a"}, {"role": U, "content": "b"}], "message 1 has role 'user'.*alternate"),
        ([{"role": A, "content": "hi"}], "message 0 has role 'assistant'.*starting with user"),
        ([{"role": "system", "content": "s"}, {"role": A, "content": "a"}], "message 1 has role 'assistant'"),
        ([{"role": U, "content": "a"}, {"role": A, "content": "b"}, {"role": A, "content": "c"}], "message 2"),
        ([{"role": U, "content": "a"}, {"role": "system", "content": "s"}], "only the first message"),
        ([{"role": "system", "content": "s"}], "only a system message"),
        ([], "no messages"),
        ([{"role": "tool", "content": "x"}], "role 'tool'"),
        ([{"role": U}], "'role' and 'content'"),
        ("hello", "list of"),
        ([{"role": U, "content": [{"type": "image", "url": "x.png"}]}], "image content.*text-only"),
        ([{"role": U, "content": 42}], "must be a string"),
    ],
)
def test_clear_errors(messages, match):
    with pytest.raises(GemmaforgeError, match=match) as error:
        format_chat(messages)
    assert "\n" not in str(error.value)


def test_official_template_also_rejects_non_alternating_roles(reference):
    with pytest.raises(Exception, match="alternate"):
        reference([{"role": U, "content": "a"}, {"role": U, "content": "b"}])
    with pytest.raises(Exception, match="alternate"):
        reference([{"role": A, "content": "a"}])
