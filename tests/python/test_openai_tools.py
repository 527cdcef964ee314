"""The real `openai` Python client calling tools on `rvllm serve --enable-auto-tool-choice
--tool-call-parser hermes` (SmolLM2 under a Hermes-style chat template).

Run by tests/tests/server_tools.rs, which starts the server and passes:
  RVLLM_BASE_URL   e.g. http://127.0.0.1:PORT/v1
  RVLLM_MODEL      the served model name
  RVLLM_TOOLS      JSON: the tool definitions (get_weather(city), get_time())
  RVLLM_FEW_SHOT   JSON: messages with three worked weather questions, then one about Paris
                   (after them SmolLM2 calls get_weather on its own)
Each test is a round trip: the model calls get_weather, the result goes back as a `tool`
message after the assistant's `tool_calls`, and the model answers; streamed and not, with
tool_choice auto, required and a named function. Greedy decoding, so the streamed calls
must equal the whole ones. Plain unittest; exits non-zero on any failure.
"""

import json
import os
import re
import unittest

import openai

BASE_URL = os.environ["RVLLM_BASE_URL"]
MODEL = os.environ["RVLLM_MODEL"]
TOOLS = json.loads(os.environ["RVLLM_TOOLS"])
FEW_SHOT = json.loads(os.environ["RVLLM_FEW_SHOT"])
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}

client = openai.OpenAI(base_url=BASE_URL, api_key="unused", max_retries=0, timeout=120)


def create(messages, stream, tool_choice, **extra):
    return client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=TOOLS,
        tool_choice=tool_choice,
        max_tokens=60,
        temperature=0,
        stream=stream,
        **extra,
    )


def whole(messages, tool_choice, **extra):
    """(content, [(id, name, arguments)], finish_reason) of a non-streamed answer."""
    c = create(messages, False, tool_choice, **extra).choices[0]
    calls = [(t.id, t.function.name, t.function.arguments) for t in c.message.tool_calls or []]
    for t in c.message.tool_calls or []:
        assert t.type == "function", t
    return c.message.content, calls, c.finish_reason


def streamed(messages, tool_choice, **extra):
    """The same, from a stream's deltas joined as a client joins them."""
    content, calls, finish = None, [], None
    for chunk in create(messages, True, tool_choice, **extra):
        for c in chunk.choices:
            if c.delta.content:
                content = (content or "") + c.delta.content
            for t in c.delta.tool_calls or []:
                if t.index == len(calls):
                    assert t.id and t.function.name, f"a call's first piece names it: {t}"
                    calls.append([t.id, t.function.name, ""])
                calls[t.index][2] += t.function.arguments or ""
            finish = c.finish_reason or finish
    return content, [tuple(c) for c in calls], finish


def without_ids(r):
    content, calls, finish = r
    return content, [(n, a) for _, n, a in calls], finish


class ToolCalls(unittest.TestCase):
    def round_trip(self, messages, tool_choice, finish, stream):
        first = (streamed if stream else whole)(messages, tool_choice)
        if stream:
            # Greedy: the stream adds up to the whole answer.
            self.assertEqual(without_ids(first), without_ids(whole(messages, tool_choice)))
        content, calls, got_finish = first
        self.assertIsNone(content, first)
        self.assertEqual(got_finish, finish, first)
        self.assertEqual(len(calls), 1, first)
        call_id, name, arguments = calls[0]
        self.assertRegex(call_id, r"^chatcmpl-tool-[0-9a-f]{32}$")
        self.assertEqual(name, "get_weather")
        self.assertEqual(json.loads(arguments)["city"], "Paris")
        # The call and its result go back; the model answers from the result.
        history = messages + [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call_id, "type": "function",
                 "function": {"name": name, "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": call_id, "content": "20 C, sunny"},
        ]
        content, calls, got_finish = (streamed if stream else whole)(history, "auto")
        self.assertEqual(calls, [], content)
        self.assertEqual(got_finish, "stop")
        self.assertRegex(content, r"20 C")

    def test_auto(self):
        for stream in (False, True):
            with self.subTest(stream=stream):
                self.round_trip(FEW_SHOT, "auto", "tool_calls", stream)

    def test_required(self):
        for stream in (False, True):
            with self.subTest(stream=stream):
                self.round_trip(QUESTION, "required", "tool_calls", stream)

    def test_named(self):
        for stream in (False, True):
            with self.subTest(stream=stream):
                # OpenAI's rule: a named function's call finishes with "stop".
                self.round_trip(QUESTION, NAMED, "stop", stream)

    def test_required_without_parallel_calls_makes_one(self):
        for r in (whole(QUESTION, "required", parallel_tool_calls=False),
                  streamed(QUESTION, "required", parallel_tool_calls=False)):
            self.assertEqual(len(r[1]), 1, r)

    def test_tool_choice_none_is_content(self):
        r = whole([{"role": "user", "content": "Say hello."}], "none")
        self.assertEqual(r[1], [])
        self.assertTrue(r[0])
        self.assertEqual(r[2], "stop")

    def test_refusals(self):
        with self.assertRaises(openai.BadRequestError) as e:
            create(QUESTION, False, {"type": "function", "function": {"name": "nope"}})
        self.assertIn("tool_choice", str(e.exception))


if __name__ == "__main__":
    unittest.main(verbosity=2)
