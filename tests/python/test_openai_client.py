"""The real `openai` Python client against a running `rvllm serve`.

Run by tests/tests/server_e2e.rs, which starts the server and passes:
  RVLLM_BASE_URL   e.g. http://127.0.0.1:PORT/v1
  RVLLM_MODEL      the served model name
  RVLLM_EXPECT     JSON: greedy outputs of `rvllm generate` for the same prompts:
                   {"max_tokens": N,
                    "completion": {"prompt": str, "text": str},
                    "chat": {"message": str, "text": str}}
Plain unittest (no pytest needed); exits non-zero on any failure.
"""

import json
import os
import unittest

import openai

BASE_URL = os.environ["RVLLM_BASE_URL"]
MODEL = os.environ["RVLLM_MODEL"]
EXPECT = json.loads(os.environ["RVLLM_EXPECT"])
MAX_TOKENS = EXPECT["max_tokens"]

client = openai.OpenAI(base_url=BASE_URL, api_key=os.environ.get("RVLLM_API_KEY", "unused"), max_retries=0, timeout=120)


class Completions(unittest.TestCase):
    prompt = EXPECT["completion"]["prompt"]
    expected = EXPECT["completion"]["text"]

    def test_greedy_matches_rvllm_generate(self):
        r = client.completions.create(model=MODEL, prompt=self.prompt, max_tokens=MAX_TOKENS, temperature=0)
        self.assertEqual(len(r.choices), 1)
        self.assertEqual(r.choices[0].text, self.expected)
        self.assertIn(r.choices[0].finish_reason, ("stop", "length"))
        self.assertEqual(r.object, "text_completion")
        self.assertEqual(r.model, MODEL)
        self.assertGreater(r.usage.prompt_tokens, 0)
        self.assertGreater(r.usage.completion_tokens, 0)
        self.assertLessEqual(r.usage.completion_tokens, MAX_TOKENS)
        self.assertEqual(r.usage.total_tokens, r.usage.prompt_tokens + r.usage.completion_tokens)

    def test_streamed_equals_unstreamed_and_reports_usage(self):
        stream = client.completions.create(
            model=MODEL,
            prompt=self.prompt,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, finish, usage, chunks = "", None, None, 0
        for chunk in stream:
            chunks += 1
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                text += c.text
                finish = c.finish_reason or finish
        self.assertEqual(text, self.expected)
        self.assertIn(finish, ("stop", "length"))
        self.assertIsNotNone(usage, "include_usage must add a usage chunk")
        self.assertGreater(usage.completion_tokens, 0)
        self.assertGreater(chunks, 2, "one chunk per delta, not one blob")

    def test_n2_seeded_sampling(self):
        r = client.completions.create(
            model=MODEL, prompt=self.prompt, max_tokens=8, temperature=0.9, n=2, seed=1234
        )
        self.assertEqual(sorted(c.index for c in r.choices), [0, 1])
        again = client.completions.create(
            model=MODEL, prompt=self.prompt, max_tokens=8, temperature=0.9, n=2, seed=1234
        )
        self.assertEqual([c.text for c in r.choices], [c.text for c in again.choices], "same seed, same output")

    def test_logprobs(self):
        r = client.completions.create(
            model=MODEL, prompt=self.prompt, max_tokens=5, temperature=0, logprobs=3
        )
        lp = r.choices[0].logprobs
        n = r.usage.completion_tokens
        self.assertEqual(len(lp.tokens), n)
        self.assertEqual(len(lp.token_logprobs), n)
        self.assertEqual(len(lp.top_logprobs), n)
        self.assertEqual(len(lp.text_offset), n)
        for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
            self.assertLessEqual(val, 0.0)
            self.assertGreaterEqual(len(top), 1)
            # Greedy: the chosen token is the most likely one.
            self.assertAlmostEqual(max(top.values()), val, places=4)
        self.assertEqual(lp.text_offset, sorted(lp.text_offset))

    def test_echo(self):
        r = client.completions.create(model=MODEL, prompt=self.prompt, max_tokens=4, temperature=0, echo=True)
        self.assertTrue(r.choices[0].text.startswith(self.prompt), r.choices[0].text)

    def test_stop_string(self):
        # Stop at a word the greedy continuation is known to contain.
        words = [w for w in self.expected.split() if len(w) >= 3]
        self.assertTrue(words, f"the reference continuation has no word to stop on: {self.expected!r}")
        stop = words[min(1, len(words) - 1)]
        r = client.completions.create(
            model=MODEL, prompt=self.prompt, max_tokens=MAX_TOKENS, temperature=0, stop=[stop]
        )
        c = r.choices[0]
        self.assertEqual(c.finish_reason, "stop")
        self.assertEqual(c.text, self.expected[: self.expected.index(stop)])
        # Streaming never leaks the stop string either.
        stream = client.completions.create(
            model=MODEL, prompt=self.prompt, max_tokens=MAX_TOKENS, temperature=0, stop=[stop], stream=True
        )
        self.assertEqual("".join(ch.choices[0].text for ch in stream if ch.choices), c.text)

    def test_errors_surface_as_openai_exceptions(self):
        with self.assertRaises(openai.BadRequestError) as cm:
            client.completions.create(model=MODEL, prompt="x", temperature=5)
        self.assertEqual(cm.exception.status_code, 400)
        self.assertIn("temperature", str(cm.exception))
        with self.assertRaises(openai.NotFoundError):
            client.completions.create(model="no-such-model", prompt="x")
        with self.assertRaises(openai.BadRequestError):
            client.completions.create(model=MODEL, prompt="x", extra_body={"no_such_field": 1})


class Chat(unittest.TestCase):
    message = EXPECT["chat"]["message"]
    expected = EXPECT["chat"]["text"]

    def messages(self):
        return [{"role": "user", "content": self.message}]

    def test_greedy_matches_rvllm_generate_chat(self):
        r = client.chat.completions.create(
            model=MODEL, messages=self.messages(), max_tokens=MAX_TOKENS, temperature=0
        )
        self.assertEqual(r.object, "chat.completion")
        self.assertEqual(r.choices[0].message.role, "assistant")
        self.assertEqual(r.choices[0].message.content, self.expected)
        self.assertIn(r.choices[0].finish_reason, ("stop", "length"))

    def test_streamed_chat(self):
        stream = client.chat.completions.create(
            model=MODEL,
            messages=self.messages(),
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, roles, finish, usage = "", [], None, None
        for chunk in stream:
            self.assertEqual(chunk.object, "chat.completion.chunk")
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                if c.delta.role:
                    roles.append(c.delta.role)
                text += c.delta.content or ""
                finish = c.finish_reason or finish
        self.assertEqual(roles, ["assistant"])
        self.assertEqual(text, self.expected)
        self.assertIn(finish, ("stop", "length"))
        self.assertIsNotNone(usage)

    def test_n2_and_logprobs(self):
        r = client.chat.completions.create(
            model=MODEL,
            messages=self.messages(),
            max_tokens=6,
            temperature=0.7,
            n=2,
            seed=7,
            logprobs=True,
            top_logprobs=2,
        )
        self.assertEqual(len(r.choices), 2)
        for c in r.choices:
            content = c.logprobs.content
            self.assertGreater(len(content), 0)
            for t in content:
                self.assertLessEqual(t.logprob, 0.0)
                self.assertEqual(len(t.top_logprobs), 2)
        self.assertEqual(r.usage.completion_tokens, sum(len(c.logprobs.content) for c in r.choices))

    def test_empty_messages_is_a_400(self):
        with self.assertRaises(openai.BadRequestError) as cm:
            client.chat.completions.create(model=MODEL, messages=[])
        self.assertIn("messages", str(cm.exception))


class Models(unittest.TestCase):
    def test_models_lists_the_served_model(self):
        ids = [m.id for m in client.models.list()]
        self.assertEqual(ids, [MODEL])


if __name__ == "__main__":
    unittest.main(verbosity=2)
