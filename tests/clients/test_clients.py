#!/usr/bin/env python3
"""The official Python clients against a running `falcon-infer serve`.

    FALCON_SERVER_URL=http://127.0.0.1:8080 [FALCON_API_KEY=...] \
    [FALCON_REFERENCE=models/tiny-7b-style/reference.json] \
        python3 tests/clients/test_clients.py

Needs the `openai` and `huggingface_hub` packages (nothing else; unittest is the runner). Every
check uses greedy decoding so that streamed and non-streamed answers must agree. With
FALCON_REFERENCE, the greedy continuation of the reference prompt must be transformers' own.
"""

import json
import os
import sys
import unittest

import huggingface_hub
import openai
from huggingface_hub import InferenceClient

URL = os.environ.get("FALCON_SERVER_URL", "http://127.0.0.1:8080").rstrip("/")
KEY = os.environ.get("FALCON_API_KEY")
REFERENCE = os.environ.get("FALCON_REFERENCE")
MAX = 12


def oai():
    return openai.OpenAI(base_url=f"{URL}/v1", api_key=KEY or "unused", max_retries=0)


def tgi():
    return InferenceClient(model=URL, token=KEY)


def model_id():
    return oai().models.list().data[0].id


class OpenAIChat(unittest.TestCase):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Tell me about falcons."},
    ]

    def test_chat_streamed_equals_not_streamed(self):
        c = oai()
        m = model_id()
        r = c.chat.completions.create(model=m, messages=self.messages, max_tokens=MAX, temperature=0)
        self.assertEqual(r.object, "chat.completion")
        self.assertEqual(len(r.choices), 1)
        choice = r.choices[0]
        self.assertEqual(choice.message.role, "assistant")
        self.assertIn(choice.finish_reason, ("stop", "length"))
        self.assertGreater(r.usage.prompt_tokens, 0)
        self.assertEqual(r.usage.total_tokens, r.usage.prompt_tokens + r.usage.completion_tokens)
        if choice.finish_reason == "length":
            self.assertEqual(r.usage.completion_tokens, MAX)

        text, finish, usage = "", None, None
        stream = c.chat.completions.create(
            model=m, messages=self.messages, max_tokens=MAX, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for ch in chunk.choices:
                text += ch.delta.content or ""
                finish = ch.finish_reason or finish
        self.assertEqual(text, choice.message.content)
        self.assertEqual(finish, choice.finish_reason)
        self.assertEqual(usage.completion_tokens, r.usage.completion_tokens)
        self.assertEqual(usage.prompt_tokens, r.usage.prompt_tokens)

    def test_chat_n_and_logprobs(self):
        r = oai().chat.completions.create(
            model=model_id(), messages=self.messages, max_tokens=4, temperature=0, n=2,
            logprobs=True, top_logprobs=2,
        )
        self.assertEqual([c.index for c in r.choices], [0, 1])
        # Greedy: both choices are the same answer.
        self.assertEqual(r.choices[0].message.content, r.choices[1].message.content)
        lp = r.choices[0].logprobs.content
        self.assertGreater(len(lp), 0)
        for t in lp:
            self.assertLessEqual(t.logprob, 0.0)
            self.assertEqual(len(t.top_logprobs), 2)
            # Greedy picks the most probable token.
            self.assertGreaterEqual(t.logprob, t.top_logprobs[0].logprob - 1e-4)

    def test_bad_request_is_an_error_naming_the_field(self):
        with self.assertRaises(openai.BadRequestError) as e:
            oai().chat.completions.create(model=model_id(), messages=self.messages, temperature=5)
        self.assertEqual(e.exception.status_code, 400)
        self.assertEqual(e.exception.body["param"], "temperature")


class OpenAICompletions(unittest.TestCase):
    prompt = "The capital of France is"

    def test_completion_streamed_equals_not_streamed(self):
        c = oai()
        m = model_id()
        r = c.completions.create(model=m, prompt=self.prompt, max_tokens=MAX, temperature=0)
        self.assertEqual(r.object, "text_completion")
        full = r.choices[0].text
        text, finish = "", None
        for chunk in c.completions.create(model=m, prompt=self.prompt, max_tokens=MAX,
                                          temperature=0, stream=True):
            for ch in chunk.choices:
                text += ch.text
                finish = ch.finish_reason or finish
        self.assertEqual(text, full)
        self.assertEqual(finish, r.choices[0].finish_reason)

    def test_several_prompts_and_stop(self):
        r = oai().completions.create(
            model=model_id(), prompt=[self.prompt, "Once upon a time"], max_tokens=MAX,
            temperature=0, stop=["\n\n"],
        )
        self.assertEqual(sorted(c.index for c in r.choices), [0, 1])
        for c in r.choices:
            self.assertNotIn("\n\n", c.text)

    def test_context_length_exceeded(self):
        with self.assertRaises(openai.BadRequestError) as e:
            oai().completions.create(model=model_id(), prompt="x", max_tokens=10_000_000)
        self.assertEqual(e.exception.code, "context_length_exceeded")


class HuggingFaceHub(unittest.TestCase):
    prompt = "The capital of France is"

    def test_text_generation(self):
        c = tgi()
        text = c.text_generation(self.prompt, max_new_tokens=MAX, do_sample=False)
        self.assertIsInstance(text, str)
        out = c.text_generation(self.prompt, max_new_tokens=MAX, do_sample=False, details=True)
        self.assertEqual(out.generated_text, text)
        d = out.details
        self.assertIn(d.finish_reason, ("length", "eos_token", "stop_sequence"))
        self.assertEqual(d.generated_tokens, len(d.tokens))
        for t in d.tokens:
            self.assertIsInstance(t.id, int)
            self.assertLessEqual(t.logprob, 0.0)

    def test_stream_with_details(self):
        c = tgi()
        full = c.text_generation(self.prompt, max_new_tokens=MAX, do_sample=False, details=True)
        events = list(c.text_generation(self.prompt, max_new_tokens=MAX, do_sample=False,
                                        details=True, stream=True))
        self.assertEqual([e.token.id for e in events], [t.id for t in full.details.tokens])
        last = events[-1]
        self.assertEqual(last.generated_text, full.generated_text)
        self.assertEqual(last.details.finish_reason, full.details.finish_reason)
        self.assertEqual(last.details.generated_tokens, full.details.generated_tokens)
        self.assertTrue(all(e.generated_text is None for e in events[:-1]))
        # Without details: the token texts.
        pieces = list(c.text_generation(self.prompt, max_new_tokens=MAX, do_sample=False, stream=True))
        self.assertEqual(len(pieces), len(events))

    def test_validation_error(self):
        with self.assertRaises(huggingface_hub.errors.ValidationError):
            tgi().text_generation(self.prompt, max_new_tokens=4, top_k=0)

    @unittest.skipUnless(REFERENCE, "FALCON_REFERENCE not set")
    def test_greedy_continuation_is_transformers(self):
        ref = json.load(open(REFERENCE))
        out = tgi().text_generation(ref["prompt"], max_new_tokens=len(ref["greedy_ids"]),
                                    do_sample=False, details=True)
        ids = [t.id for t in out.details.tokens]
        # The server stops at an end-of-text token; transformers' reference never does.
        self.assertEqual(ids, ref["greedy_ids"][: len(ids)])
        if out.details.finish_reason == "length":
            self.assertEqual(ids, ref["greedy_ids"])


if __name__ == "__main__":
    print(f"openai {openai.__version__}, huggingface_hub {huggingface_hub.__version__}, {URL}",
          file=sys.stderr)
    unittest.main(verbosity=2)
