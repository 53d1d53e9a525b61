"""vLLM's `continue_final_message` on /v1/chat/completions (the playground's Continue): the last
message, the assistant's, stays open and the model goes on with it, exactly as a completion of
the rendered conversation without the end-of-turn token after that message."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from servers import running

import gptj
from gptj.chat import ChatSession, ChatTemplate, PlayScript
from gptj.serve import create_app

CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is"},
]
CONTINUE = {"continue_final_message": True, "add_generation_prompt": False}


@pytest.fixture(scope="module")
def client(bundled_model: gptj.Model) -> Iterator[httpx.Client]:
    with running(create_app(bundled_model)) as url, httpx.Client(base_url=url, timeout=120) as c:
        yield c


def test_the_template_leaves_the_last_message_open_as_transformers_does(bundled_model: gptj.Model) -> None:
    from transformers import AutoTokenizer

    from gptj.loading.gguf import bundled_gguf_path

    path = bundled_gguf_path()
    ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    template = ChatTemplate(bundled_model.tokenizer.chat_template)
    for messages in (CONVERSATION, [{"role": "system", "content": "Be brief."}, *CONVERSATION]):
        ours = template.render(messages, add_generation_prompt=False, continue_final_message=True)
        assert ours == ref.apply_chat_template(messages, tokenize=False, continue_final_message=True)
        closed = template.render(messages, add_generation_prompt=False)
        assert closed == ours + "<|im_end|>\n"  # the same text with the turn closed
    # an empty reply to continue starts the assistant's turn, as the generation prompt does
    empty = [*CONVERSATION[:1], {"role": "assistant", "content": ""}]
    assert template.render(empty, continue_final_message=True) == template.render(CONVERSATION[:1])


def test_greedy_continuation_is_the_completion_of_the_open_conversation(client: httpx.Client,
                                                                        bundled_model: gptj.Model) -> None:
    closed = ChatTemplate(bundled_model.tokenizer.chat_template).render(CONVERSATION, add_generation_prompt=False)
    prompt = closed.removesuffix("<|im_end|>\n")
    assert prompt.endswith("The capital of France is")
    settings = {"temperature": 0, "max_tokens": 12}
    completion = client.post("/v1/completions", json={"prompt": prompt, **settings})
    assert completion.status_code == 200, completion.text
    expected = completion.json()["choices"][0]["text"]
    assert "Paris" in expected

    chat = client.post("/v1/chat/completions", json={"messages": CONVERSATION, **CONTINUE, **settings})
    assert chat.status_code == 200, chat.text
    choice = chat.json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected}
    assert chat.json()["usage"]["prompt_tokens"] == completion.json()["usage"]["prompt_tokens"]

    streamed = ""
    with client.stream("POST", "/v1/chat/completions",
                       json={"messages": CONVERSATION, "continue_final_message": True, "stream": True, **settings}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    streamed += c["delta"].get("content") or ""
    assert streamed == expected  # add_generation_prompt left out: false when continuing

    answered = client.post("/v1/chat/completions", json={"messages": CONVERSATION, **settings}).json()
    assert answered["choices"][0]["message"]["content"] != expected  # without it: a new turn


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"messages": CONVERSATION[:1], **CONTINUE}, "continue_final_message", "assistant"),
    ({"messages": CONVERSATION, "continue_final_message": True, "add_generation_prompt": True},
     "add_generation_prompt", "continue_final_message"),
])
def test_continuing_what_cannot_be_continued_is_a_400(client: httpx.Client, body: dict, param: str, words: str) -> None:
    r = client.post("/v1/chat/completions", json={**body, "max_tokens": 4})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"]


def test_a_play_script_continues_the_bots_last_line(bundled_model: gptj.Model) -> None:
    script = PlayScript(intro="A chat.", user_name="You", bot_name="GPT-J")
    messages = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "It is "}]
    assert script.prompt(messages, continue_final_message=True) == "A chat.\n\nYou: Capital of France?\nGPT-J: It is "
    assert script.prompt(messages) == "A chat.\n\nYou: Capital of France?\nGPT-J: It is\nGPT-J:"
    assert script.clean_reply(" Paris.\nYou: thanks", continuing=True) == " Paris."
    session = ChatSession(bundled_model, script)
    prompt, settings, _ = session.prepare(messages, {"max_new_tokens": 4}, continue_final_message=True)
    assert prompt.endswith("GPT-J: It is ") and settings["token_healing"] is True  # free text: healed as asked
    _, settings, _ = session.prepare(messages[:1], {"max_new_tokens": 4})
    assert settings["token_healing"] is False
