"""The real `openai` Python client asking `rvllm serve` for structured output: the SDK's
`chat.completions.parse(response_format=<pydantic model>)` returns a parsed object (streamed
too), and vLLM's `guided_choice` / `structured_outputs` go through `extra_body`.

Run by tests/tests/structured_output.rs, which starts the server (SmolLM2 on the CPU) and
passes RVLLM_BASE_URL (e.g. http://127.0.0.1:PORT/v1) and RVLLM_MODEL. Plain unittest;
exits non-zero on any failure.
"""

import os
import unittest
from typing import List, Literal

import openai
from pydantic import BaseModel, Field

BASE_URL = os.environ["RVLLM_BASE_URL"]
MODEL = os.environ["RVLLM_MODEL"]

client = openai.OpenAI(base_url=BASE_URL, api_key="unused", max_retries=0, timeout=300)


class City(BaseModel):
    name: str = Field(max_length=16)
    country: str = Field(max_length=16)
    population_millions: float = Field(ge=0, le=40)
    continent: Literal["Europe", "Asia", "Africa", "America", "Oceania"]


class Itinerary(BaseModel):
    traveller: str = Field(max_length=12)
    days: int = Field(ge=1, le=14)
    cities: List[City] = Field(min_length=1, max_length=2)


MESSAGES = [{"role": "user", "content": "Plan a short trip to two European cities, as JSON."}]


class Parse(unittest.TestCase):
    def test_parse_returns_the_pydantic_object(self):
        r = client.chat.completions.parse(
            model=MODEL, messages=MESSAGES, response_format=Itinerary, max_tokens=200, temperature=0
        )
        choice = r.choices[0]
        self.assertEqual(choice.finish_reason, "stop", choice.message.content)
        parsed = choice.message.parsed
        self.assertIsInstance(parsed, Itinerary, choice.message.content)
        self.assertTrue(1 <= parsed.days <= 14)
        self.assertTrue(1 <= len(parsed.cities) <= 2)
        self.assertEqual(Itinerary.model_validate_json(choice.message.content), parsed)

    def test_streamed_parse_gives_the_same_object(self):
        whole = client.chat.completions.parse(
            model=MODEL, messages=MESSAGES, response_format=Itinerary, max_tokens=200, temperature=0
        ).choices[0].message.parsed
        with client.chat.completions.stream(
            model=MODEL, messages=MESSAGES, response_format=Itinerary, max_tokens=200, temperature=0
        ) as stream:
            final = stream.get_final_completion()
        self.assertEqual(final.choices[0].message.parsed, whole)

    def test_guided_choice_through_extra_body(self):
        for seed in range(3):
            r = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Is the sky green?"}],
                max_tokens=10,
                temperature=1.0,
                seed=seed,
                extra_body={"guided_choice": ["yes", "no", "maybe"]},
            )
            self.assertIn(r.choices[0].message.content, ["yes", "no", "maybe"])

    def test_structured_outputs_regex_on_completions(self):
        r = client.completions.create(
            model=MODEL,
            prompt="The year the first moon landing happened:",
            max_tokens=10,
            temperature=0,
            extra_body={"structured_outputs": {"regex": "19[0-9]{2}"}},
        )
        self.assertRegex(r.choices[0].text, r"^19[0-9]{2}$")

    def test_a_bad_schema_is_a_400(self):
        with self.assertRaises(openai.BadRequestError) as cm:
            client.chat.completions.create(
                model=MODEL,
                messages=MESSAGES,
                max_tokens=10,
                response_format={"type": "json_schema",
                                 "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}},
            )
        self.assertIn("no-such-type", str(cm.exception))


if __name__ == "__main__":
    unittest.main(verbosity=2)
