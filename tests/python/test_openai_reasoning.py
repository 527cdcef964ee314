"""The real `openai` Python client reading `reasoning_content` from `rvllm serve
--reasoning-parser deepseek_r1`.

Run by tests/tests/server_reasoning.rs, which starts the server and passes:
  RVLLM_BASE_URL   e.g. http://127.0.0.1:PORT/v1
  RVLLM_MODEL      the served model name
  RVLLM_EXPECT     JSON: {"message": str, "max_tokens": N, "text": str}, the greedy text of
                   `rvllm generate --chat` for that one user message
SmolLM2 never writes </think>, so under deepseek_r1 its whole answer is thinking; a
continued assistant turn that closes its thinking (echoed back through the parser) shows
the split. Plain unittest; exits non-zero on any failure.
"""

import json
import os
import unittest

import openai

BASE_URL = os.environ["RVLLM_BASE_URL"]
MODEL = os.environ["RVLLM_MODEL"]
EXPECT = json.loads(os.environ["RVLLM_EXPECT"])

client = openai.OpenAI(base_url=BASE_URL, api_key="unused", max_retries=0, timeout=120)


def chat(messages, stream, **extra_body):
    return client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=EXPECT["max_tokens"],
        temperature=0,
        stream=stream,
        extra_body=extra_body or None,
    )


def joined(stream):
    """(reasoning_content, content) of a stream's deltas, each None if none came."""
    reasoning, content, finish = None, None, None
    for chunk in stream:
        for c in chunk.choices:
            r = getattr(c.delta, "reasoning_content", None)
            if r:
                reasoning = (reasoning or "") + r
            if c.delta.content:
                content = (content or "") + c.delta.content
            finish = c.finish_reason or finish
    return reasoning, content, finish


class Reasoning(unittest.TestCase):
    user = [{"role": "user", "content": EXPECT["message"]}]

    def test_unclosed_thinking_is_all_reasoning(self):
        r = chat(self.user, stream=False)
        m = r.choices[0].message
        self.assertEqual(m.reasoning_content, EXPECT["text"])
        self.assertEqual(m.model_extra.get("reasoning"), EXPECT["text"])
        self.assertIsNone(m.content)
        reasoning, content, finish = joined(chat(self.user, stream=True))
        self.assertEqual(reasoning, EXPECT["text"])
        self.assertIsNone(content)
        self.assertIn(finish, ("stop", "length"))

    def test_closed_thinking_splits_whole_and_streamed_alike(self):
        messages = self.user + [{"role": "assistant", "content": "<think>Recall the rainbow.</think>Red,"}]
        extra = {"echo": True, "continue_final_message": True, "add_generation_prompt": False}
        m = chat(messages, stream=False, **extra).choices[0].message
        self.assertEqual(m.reasoning_content, "Recall the rainbow.")
        self.assertTrue(m.content.startswith("Red,"), m.content)
        reasoning, content, _ = joined(chat(messages, stream=True, **extra))
        self.assertEqual((reasoning, content), (m.reasoning_content, m.content))

    def test_reasoning_in_the_history_is_accepted(self):
        messages = self.user + [
            {"role": "assistant", "content": "Red.", "reasoning_content": "Think."},
            {"role": "user", "content": "More?"},
        ]
        r = chat(messages, stream=False)
        self.assertIsNotNone(r.choices[0].message.reasoning_content)


if __name__ == "__main__":
    unittest.main(verbosity=2)
