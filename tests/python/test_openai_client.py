"""The real `openai` Python client against a running `rvllm serve`.

Run by tests/tests/server_e2e.rs, which starts the server and passes:
  RVLLM_BASE_URL   e.g. http://127.0.0.1:PORT/v1
  RVLLM_MODEL      the served model name
  RVLLM_EXPECT     JSON: greedy outputs of `rvllm generate` for the same prompts:
                   {"max_tokens": N,
                    "completion": {"prompt": str, "text": str},
                    "chat": {"message": str, "text": str},
                    "prompt_logprobs": {"k": K, "completion": P, "chat": P}}
                   where P is the engine's prompt logprobs of that prompt (`rvllm generate
                   --prompt-logprobs K`): {"prompt_token_ids": [...], "entries": [null,
                   {"token_id", "logprob", "rank", "top": [[id, logprob], ...]}, ...]}
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


class PromptLogprobs(unittest.TestCase):
    """vLLM's `prompt_logprobs` (sent through extra_body): per prompt token, null first, then
    {token id: {"logprob", "rank", "decoded_token"}} holding the prompt token and the top K."""

    k = EXPECT["prompt_logprobs"]["k"]

    def check_against_engine(self, plp, expected, prompt_tokens):
        ids = expected["prompt_token_ids"]
        self.assertEqual(len(plp), prompt_tokens, "one entry per prompt token")
        self.assertEqual(len(plp), len(ids))
        self.assertIsNone(plp[0], "nothing precedes the first prompt token")
        for pos in range(1, len(ids)):
            entry, want = plp[pos], expected["entries"][pos]
            where = f"position {pos}: {entry}"
            self.assertIsInstance(entry, dict, where)
            tid = str(ids[pos])
            self.assertIn(tid, entry, "the actual prompt token is present: " + where)
            self.assertEqual(want["token_id"], ids[pos])
            own = entry[tid]
            self.assertEqual(set(own), {"logprob", "rank", "decoded_token"}, where)
            self.assertAlmostEqual(own["logprob"], want["logprob"], delta=1e-4, msg=where)
            self.assertLessEqual(own["logprob"], 0.0, where)
            self.assertIsInstance(own["decoded_token"], str, where)
            # The top K alternatives, with the engine's values and ranks 1..K.
            top = want["top"]
            self.assertEqual(len(top), self.k)
            for r, (alt, lp) in enumerate(top, start=1):
                got = entry.get(str(alt))
                self.assertIsNotNone(got, f"alternative {alt} missing at {where}")
                self.assertAlmostEqual(got["logprob"], lp, delta=1e-4, msg=where)
                self.assertEqual(got["rank"], r, where)
                self.assertIsInstance(got["decoded_token"], str, where)
            top_ids = [alt for alt, _ in top]
            self.assertEqual(len(entry), self.k + (0 if ids[pos] in top_ids else 1), where)
            if ids[pos] in top_ids:
                self.assertEqual(own["rank"], top_ids.index(ids[pos]) + 1, where)
            else:
                self.assertEqual(own["rank"], want["rank"], where)
                self.assertGreater(own["rank"], self.k, where)
                self.assertLessEqual(own["logprob"], top[-1][1] + 1e-6, where)
            # Ranks follow the logprobs.
            ranked = sorted(entry.values(), key=lambda e: e["rank"])
            self.assertEqual([e["logprob"] for e in ranked], sorted((e["logprob"] for e in ranked), reverse=True))
        return [plp[pos][str(ids[pos])]["decoded_token"] for pos in range(1, len(ids))]

    def test_completion_prompt_logprobs_equal_the_engines(self):
        expected = EXPECT["prompt_logprobs"]["completion"]
        prompt = EXPECT["completion"]["prompt"]
        r = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=2, temperature=0, extra_body={"prompt_logprobs": self.k}
        )
        body = r.model_dump()
        self.assertNotIn("prompt_logprobs", body, "completions carry them per choice, not at the top")
        plp = body["choices"][0]["prompt_logprobs"]
        decoded = self.check_against_engine(plp, expected, r.usage.prompt_tokens)
        # The prompt tokens' texts after the first spell the end of the prompt.
        self.assertTrue(prompt.endswith("".join(decoded)), decoded)
        self.assertGreater(len("".join(decoded)), 0)

    def test_every_choice_of_every_prompt_carries_its_own(self):
        prompt = EXPECT["completion"]["prompt"]
        r = client.completions.create(
            model=MODEL,
            prompt=[prompt, "Hello"],
            n=2,
            max_tokens=1,
            temperature=0,
            extra_body={"prompt_logprobs": 0},
        )
        by_prompt = {}
        for c in sorted(r.model_dump()["choices"], key=lambda c: c["index"]):
            plp = c["prompt_logprobs"]
            self.assertIsNone(plp[0])
            for e in plp[1:]:
                self.assertEqual(len(e), 1, "prompt_logprobs=0: the prompt token alone")
            by_prompt.setdefault(c["index"] // 2, []).append(plp)
        self.assertEqual(sorted(by_prompt), [0, 1])
        for plps in by_prompt.values():
            self.assertEqual(plps[0], plps[1], "the n choices of one prompt share its prompt logprobs")
        ids = EXPECT["prompt_logprobs"]["completion"]["prompt_token_ids"]
        self.assertEqual(len(by_prompt[0][0]), len(ids))
        self.assertEqual(len(by_prompt[1][0]), r.usage.prompt_tokens - len(ids), "the second prompt's own length")

    def test_chat_prompt_logprobs_are_at_the_top_level(self):
        expected = EXPECT["prompt_logprobs"]["chat"]
        r = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": EXPECT["chat"]["message"]}],
            max_tokens=2,
            temperature=0,
            extra_body={"prompt_logprobs": self.k},
        )
        body = r.model_dump()
        self.check_against_engine(body["prompt_logprobs"], expected, r.usage.prompt_tokens)
        self.assertNotIn("prompt_logprobs", body["choices"][0])

    def test_absent_unless_asked(self):
        r = client.completions.create(model=MODEL, prompt="Hi", max_tokens=1)
        self.assertIsNone(r.model_dump()["choices"][0].get("prompt_logprobs"))
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
        self.assertIsNone(r.model_dump().get("prompt_logprobs"))

    def assert_refused(self, create, words, **kwargs):
        with self.assertRaises(openai.BadRequestError) as cm:
            create(**kwargs)
        e = cm.exception
        self.assertEqual(e.status_code, 400)
        error = e.response.json()["error"]
        self.assertEqual(error["type"], "invalid_request_error", error)
        self.assertEqual(error["param"], "prompt_logprobs", error)
        self.assertIn(words, error["message"])
        return error["message"]

    def test_bad_values_are_400s_that_say_what_to_send(self):
        completion = lambda plp, **kw: client.completions.create(  # noqa: E731
            model=MODEL, prompt="x", max_tokens=1, extra_body={"prompt_logprobs": plp}, **kw
        )
        chat = lambda plp, **kw: client.chat.completions.create(  # noqa: E731
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1,
            extra_body={"prompt_logprobs": plp}, **kw
        )
        for create in (completion, chat):
            msg = self.assert_refused(create, "between 0 and 20", plp=-3)
            self.assertIn("got -3", msg)
            self.assert_refused(create, "whole vocabulary", plp=-1)
            self.assert_refused(create, "got 21", plp=21)
            self.assert_refused(create, "not available when `stream=True`", plp=2, stream=True)
        with self.assertRaises(openai.BadRequestError) as cm:
            completion("3")
        self.assertIn("prompt_logprobs", str(cm.exception))
        # Still serving afterwards.
        self.assertEqual(len(completion(1).choices), 1)


class Models(unittest.TestCase):
    def test_models_lists_the_served_model(self):
        ids = [m.id for m in client.models.list()]
        self.assertEqual(ids, [MODEL])


if __name__ == "__main__":
    unittest.main(verbosity=2)
