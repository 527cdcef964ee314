//! `logit_bias` (OpenAI) and vLLM's `allowed_token_ids` and `bad_words` (sent through
//! `extra_body`) from the real `openai` Python client against the real `rvllm serve` on
//! loopback, with the tiny Llama fixture (random weights, a real tokenizer): a +100 bias
//! forces its token, allowed ids bound every token, a bad word never appears, and bad values
//! are 400s naming the field.
mod server_common;

use std::process::Command;

use server_common::{idle_and_no_leak, tiny_model, Server};

const MODEL: &str = "tiny";

/// The client side; exits non-zero on any failure (plain unittest).
const SCRIPT: &str = r#"
import json, os, unittest, urllib.request
import openai

BASE = os.environ["RVLLM_BASE_URL"]
MODEL = os.environ["RVLLM_MODEL"]
client = openai.OpenAI(base_url=BASE + "/v1", api_key="unused", max_retries=0, timeout=120)
PROMPT = "The quick brown fox"

def token_ids(choice):
    ids = getattr(choice, "token_ids", None)
    if ids is None:
        ids = choice.model_extra["token_ids"]
    return list(ids)

def complete(**kw):
    extra = dict(kw.pop("extra_body", {}), return_token_ids=True, ignore_eos=True)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, extra_body=extra, **kw)
    return [token_ids(c) for c in r.choices]

def tokenize(text):
    req = urllib.request.Request(BASE + "/tokenize", data=json.dumps(
        {"model": MODEL, "prompt": text, "add_special_tokens": False}).encode(),
        headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req).read())["tokens"]

def contains(seq, sub):
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))

class SamplingFields(unittest.TestCase):
    def test_logit_bias_plus_100_forces_the_token(self):
        for seed in (1, 2):
            for ids in complete(temperature=1.0, seed=seed, n=2, logit_bias={"77": 100}):
                self.assertEqual(ids, [77] * 24)
        chat = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
            temperature=0.8, seed=3, logit_bias={"123": 100},
            extra_body={"return_token_ids": True, "ignore_eos": True})
        self.assertEqual(token_ids(chat.choices[0]), [123] * 8)

    def test_allowed_token_ids_bound_every_token(self):
        allowed = [5, 17, 300, 411]
        for ids in complete(temperature=1.5, seed=7, n=3, extra_body={"allowed_token_ids": allowed}):
            self.assertEqual(len(ids), 24)
            self.assertTrue(set(ids) <= set(allowed), ids)
        greedy = complete(temperature=0, extra_body={"allowed_token_ids": [9, 10]})[0]
        self.assertTrue(set(greedy) <= {9, 10}, greedy)

    def test_bad_words_never_appear(self):
        # The token greedy decoding likes most, as a word: banned, it must vanish.
        free = complete(temperature=0)[0]
        target = max(set(free), key=free.count)
        req = urllib.request.Request(BASE + "/detokenize", data=json.dumps(
            {"model": MODEL, "tokens": [target]}).encode(), headers={"Content-Type": "application/json"})
        word = json.loads(urllib.request.urlopen(req).read())["prompt"]
        self.assertTrue(word.strip(), "token %d decodes to blank text %r" % (target, word))
        banned = [tokenize(word.lstrip()), tokenize(" " + word.lstrip())]
        for ids in [complete(temperature=0, extra_body={"bad_words": [word]})[0]] + \
                complete(temperature=1.0, seed=5, n=2, extra_body={"bad_words": [word]}):
            # vLLM's rule: the word itself always; its spaced form when it is a distinct
            # sequence of the same length.
            self.assertFalse(contains(ids, banned[0]), "%r (%s) in %s" % (word, banned[0], ids))
            if len(banned[1]) == len(banned[0]) and banned[1][0] != banned[0][0]:
                self.assertFalse(contains(ids, banned[1]), "%r (%s) in %s" % (word, banned[1], ids))
        if banned[0] == [target]:
            self.assertIn(target, free, "the ban changed something")

    def test_bad_values_are_400s_naming_the_field(self):
        cases = [
            ({"logit_bias": {"not-an-id": 1}}, "logit_bias"),
            ({"logit_bias": {"999999": 1}}, "logit_bias"),
            ({"logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"),
            ({"extra_body": {"allowed_token_ids": []}}, "allowed_token_ids"),
            ({"extra_body": {"allowed_token_ids": [1, 100000]}}, "allowed_token_ids"),
            ({"extra_body": {"bad_words": ["x"] * 129}}, "bad_words"),
            ({"extra_body": {"bad_words": [" ".join(["zq"] * 40)]}}, "bad_words"),
        ]
        for kw, field in cases:
            with self.subTest(field=field, kw=str(kw)[:80]):
                with self.assertRaises(openai.BadRequestError) as cm:
                    client.completions.create(model=MODEL, prompt="x", max_tokens=2, **kw)
                self.assertEqual(cm.exception.status_code, 400)
                self.assertIn(field, str(cm.exception))
                self.assertEqual(cm.exception.body.get("param"), field, cm.exception.body)

unittest.main(verbosity=2)
"#;

#[test]
fn openai_client_logit_bias_allowed_token_ids_and_bad_words() {
    let s = Server::start(&tiny_model(), &["--served-model-name", MODEL], &[]);
    server_common::run_openai_unittest(
        &s,
        &["-c", SCRIPT],
        &[
            ("RVLLM_BASE_URL", format!("http://{}", s.addr)),
            ("RVLLM_MODEL", MODEL.into()),
        ],
    );
    s.wait_metrics(
        std::time::Duration::from_secs(10),
        "an idle engine",
        idle_and_no_leak,
    );
}

/// The same fields as `rvllm generate` flags: the generated token ids of one prompt.
fn generate_ids(extra: &[&str]) -> Result<Vec<u64>, String> {
    let out = Command::new(server_common::rvllm_bin())
        .args([
            "generate",
            "--device",
            "cpu",
            "--disable-progress",
            "--output",
            "json",
        ])
        .arg("--model")
        .arg(tiny_model())
        .args([
            "--max-tokens",
            "12",
            "--ignore-eos",
            "--prompt",
            "The quick brown fox",
        ])
        .args(extra)
        .output()
        .expect("running rvllm generate");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--output json");
    Ok(v["outputs"][0]["outputs"][0]["token_ids"]
        .as_array()
        .expect("token_ids")
        .iter()
        .map(|t| t.as_u64().expect("a token id"))
        .collect())
}

#[test]
fn generate_flags_logit_bias_allowed_token_ids_and_bad_words() {
    let sampled = ["--temperature", "1", "--seed", "4"];
    let forced =
        generate_ids(&[&sampled[..], &["--logit-bias", "77=100,5=-2.5"]].concat()).unwrap();
    assert_eq!(forced, vec![77; 12]);
    let bounded =
        generate_ids(&[&sampled[..], &["--allowed-token-ids", "4,9,300"]].concat()).unwrap();
    assert!(
        bounded.iter().all(|t| [4, 9, 300].contains(t)),
        "{bounded:?}"
    );
    // Token 77 decodes to "k" in this vocabulary: forced by the bias, banned as a bad word,
    // the ban wins (the bias cannot lift a -inf).
    let banned = generate_ids(
        &[
            &sampled[..],
            &["--logit-bias", "77=100", "--bad-words", "k"],
        ]
        .concat(),
    )
    .unwrap();
    assert!(!banned.contains(&77), "{banned:?}");
    let err = generate_ids(&["--logit-bias", "999999=1"]).unwrap_err();
    assert!(err.contains("logit_bias") && err.contains("vocab"), "{err}");
    let err = generate_ids(&["--logit-bias", "77"]).unwrap_err();
    assert!(err.contains("ID=BIAS"), "{err}");
}
