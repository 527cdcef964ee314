//! Structured output: a request's `StructuredOutput` (JSON schema, regex, choice, Lark
//! grammar) compiled by llguidance into a per-sequence matcher whose token mask constrains
//! sampling.
//!
//! One [`StructuredOutputs`] per tokenizer holds llguidance's view of the vocabulary and a
//! cache of compiled grammars keyed by the spec, so admission (which compiles to turn a bad
//! schema into a 400) and the runner (which starts one matcher per sequence) compile once.
//! A [`GrammarMatcher`] gives the allowed tokens of the next position as a packed bitmask
//! (bit `t % 32` of word `t / 32`), applied before every other logits processor as in vLLM
//! v1, and advances on each sampled token. The model's end-of-sequence ids are allowed
//! exactly when the grammar accepts, and once the grammar can go no further they are the
//! only tokens allowed, so the sequence stops. A matcher that fails (a limit of llguidance
//! reached mid-stream) also allows only end-of-sequence: output is never left unconstrained.
mod grammar;
mod vocab;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::Result;
use llguidance::{Matcher, ParserFactory};

use super::{ParamError, SamplingParams, StructuredOutput};

pub use grammar::json_layout;

/// Most compiled grammars kept; past it the cache starts over (a server's requests reuse a
/// handful of schemas, a flood of distinct ones only costs recompiles).
const CACHE_ENTRIES: usize = 512;

/// What an engine can do with constrained requests: compile them, or refuse them with the
/// reason (no tokenizer, a vocabulary llguidance cannot read, a runner without the mask).
/// llguidance's view of the vocabulary is built on the first constrained request, so an
/// engine that never gets one never pays for it. Clones share it.
#[derive(Clone)]
pub struct StructuredSupport(Arc<Support>);

struct Support {
    built: OnceLock<Result<Arc<StructuredOutputs>, Arc<str>>>,
    /// What to build from, or why not; taken by the first use.
    source: Mutex<Option<Result<Source, Arc<str>>>>,
}

/// The tokenizer, the model's EOS ids and its logits per row.
type Source = (tokenizers::Tokenizer, Vec<u32>, usize);

impl std::fmt::Debug for StructuredSupport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StructuredSupport")
            .field("built", &self.0.built.get().map(|r| r.is_ok()))
            .finish()
    }
}

impl StructuredSupport {
    /// For an engine whose runner applies the grammar mask: refused when there is no
    /// tokenizer or (found on first use) llguidance cannot read it.
    pub fn lazy(
        tokenizer: Option<&tokenizers::Tokenizer>,
        eos_token_ids: &[u32],
        model_vocab: usize,
    ) -> Self {
        let source = match tokenizer {
            Some(t) => Ok((t.clone(), eos_token_ids.to_vec(), model_vocab)),
            None => Err("this model has no tokenizer, so its outputs cannot be constrained".into()),
        };
        Self(Arc::new(Support {
            built: OnceLock::new(),
            source: Mutex::new(Some(source)),
        }))
    }

    /// Every constrained request is refused with `reason`.
    pub fn refused(reason: &str) -> Self {
        let support = Self::lazy(None, &[], 0);
        let _ = support.0.built.set(Err(reason.into()));
        support
    }

    /// The compiler, built on first use; Err: why constrained requests are refused.
    pub fn get(&self) -> Result<&Arc<StructuredOutputs>, Arc<str>> {
        self.0
            .built
            .get_or_init(|| {
                let source = self
                    .0
                    .source
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                let (tokenizer, eos, vocab) = match source {
                    Some(Ok(s)) => s,
                    Some(Err(why)) => return Err(why),
                    None => return Err("structured output failed to start".into()),
                };
                StructuredOutputs::new(&tokenizer, &eos, vocab)
                    .map(Arc::new)
                    .map_err(|e| {
                        format!("structured output is unavailable for this model: {e:#}").into()
                    })
            })
            .as_ref()
            .map_err(Arc::clone)
    }
}

/// Admission's check of a request's constraint: it must compile (Err names the problem,
/// for a 400) and the engine must be able to apply it.
pub fn check_request(
    support: &StructuredSupport,
    params: &SamplingParams,
) -> Result<(), ParamError> {
    let Some(spec) = &params.structured_output else {
        return Ok(());
    };
    let error = |message: String| ParamError {
        param: "structured_outputs",
        message,
    };
    let outputs = support.get().map_err(|why| error(why.to_string()))?;
    outputs
        .check(spec)
        .map_err(|e| error(format!("{} does not compile: {e}", spec_kind(spec))))
}

/// The constraint's kind as the request gave it, for messages.
pub fn spec_kind(spec: &StructuredOutput) -> &'static str {
    match spec {
        StructuredOutput::JsonSchema(_) => "the JSON schema",
        StructuredOutput::JsonObject => "the JSON object constraint",
        StructuredOutput::Regex(_) => "the regular expression",
        StructuredOutput::Choice(_) => "the choice list",
        StructuredOutput::Grammar(_) => "the grammar",
    }
}

/// Compiles constraints against one tokenizer and caches them.
pub struct StructuredOutputs {
    factory: ParserFactory,
    eos: Arc<[u32]>,
    vocab: usize,
    /// Spec (as JSON) → a fresh matcher to clone, or why the spec does not compile.
    cache: Mutex<HashMap<String, Result<Matcher, String>>>,
}

impl std::fmt::Debug for StructuredOutputs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StructuredOutputs")
            .field("vocab", &self.vocab)
            .field("eos", &self.eos)
            .finish()
    }
}

impl StructuredOutputs {
    /// For `tokenizer` and a model of `model_vocab` logits whose end-of-sequence ids are
    /// `eos_token_ids`. Err when llguidance cannot read the vocabulary.
    pub fn new(
        tokenizer: &tokenizers::Tokenizer,
        eos_token_ids: &[u32],
        model_vocab: usize,
    ) -> Result<Self> {
        let words = vocab::token_bytes(tokenizer, model_vocab)?;
        let env = vocab::tok_env(&words, eos_token_ids)?;
        let mut factory = ParserFactory::new_simple(&env)?;
        factory.quiet();
        Ok(Self {
            factory,
            eos: eos_token_ids.into(),
            vocab: model_vocab,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Logits per row (the bitmask covers `vocab.div_ceil(32)` words).
    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    /// Checks that `spec` compiles; Err says what is wrong, for a 400.
    pub fn check(&self, spec: &StructuredOutput) -> Result<(), String> {
        self.compiled(spec).map(|_| ())
    }

    /// A matcher at the start of `spec`'s grammar, for one sequence.
    pub fn matcher(&self, spec: &StructuredOutput) -> Result<GrammarMatcher, String> {
        Ok(GrammarMatcher {
            matcher: self.compiled(spec)?,
            eos: self.eos.clone(),
            vocab: self.vocab,
        })
    }

    fn compiled(&self, spec: &StructuredOutput) -> Result<Matcher, String> {
        let key = serde_json::to_string(spec).map_err(|e| e.to_string())?;
        if let Some(hit) = self.lock().get(&key) {
            return hit.clone();
        }
        // Compiled outside the lock: a large schema must not hold up every other request.
        let fresh = self.compile(spec);
        let mut cache = self.lock();
        if cache.len() >= CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(key, fresh.clone());
        fresh
    }

    fn compile(&self, spec: &StructuredOutput) -> Result<Matcher, String> {
        let grammar = grammar::top_level(spec)?;
        // llguidance reports bad input as errors; a panic inside it is still a bad spec
        // from the client's side, never a crashed server.
        let parser = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.factory.create_parser(grammar)
        }))
        .map_err(|_| "the grammar could not be compiled (llguidance failed)".to_string())?
        .map_err(|e| e.to_string())?;
        let mut matcher = Matcher::new(Ok(parser));
        // The first mask builds the lexer: errors that only show there (a regex too large,
        // fuel limits) are found now, at admission, not mid-stream.
        matcher.compute_mask().map_err(|e| e.to_string())?;
        Ok(matcher)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Result<Matcher, String>>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One sequence's position in its grammar.
#[derive(Clone)]
pub struct GrammarMatcher {
    matcher: Matcher,
    eos: Arc<[u32]>,
    vocab: usize,
}

impl std::fmt::Debug for GrammarMatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarMatcher")
            .field("stopped", &self.matcher.is_stopped())
            .field("error", &self.matcher.get_error())
            .finish()
    }
}

/// Words of the packed bitmask of a `vocab`-token row.
pub fn bitmask_words(vocab: usize) -> usize {
    vocab.div_ceil(32)
}

impl GrammarMatcher {
    /// Writes the tokens allowed next into `words` (`bitmask_words(vocab)` long): the
    /// grammar's tokens, and the end-of-sequence ids when it accepts or can go no further.
    pub fn fill_bitmask(&mut self, words: &mut [u32]) {
        words.fill(0);
        let mut allow_eos = true;
        if !self.matcher.is_stopped() {
            if let Ok(mask) = self.matcher.compute_mask() {
                let src = mask.as_slice();
                let n = src.len().min(words.len());
                words[..n].copy_from_slice(&src[..n]);
                // Bits past the model's vocabulary (a tokenizer larger than the model)
                // are never sampled; clear them so the mask means only real rows.
                let (tail, full) = (self.vocab % 32, n == words.len());
                if let (Some(last), true, true) = (words.last_mut(), tail != 0, full) {
                    *last &= (1u32 << tail) - 1;
                }
                allow_eos = self.matcher.is_accepting().unwrap_or(true);
            }
        }
        for &t in self.eos.iter() {
            let (w, b) = ((t / 32) as usize, t % 32);
            if let Some(word) = words.get_mut(w) {
                if allow_eos {
                    *word |= 1 << b;
                } else {
                    *word &= !(1 << b);
                }
            }
        }
    }

    /// A matcher that allows only end of sequence: what a constrained sequence gets when its
    /// constraint cannot be applied after admission (never an unconstrained output).
    pub fn refused(eos_token_ids: &[u32], vocab: usize, reason: &str) -> Self {
        Self {
            matcher: Matcher::new(Err(anyhow::anyhow!("{reason}"))),
            eos: eos_token_ids.into(),
            vocab,
        }
    }

    /// Advances past a sampled token. End of sequence, or anything after the grammar has
    /// stopped, ends the request and is not fed in; a token the grammar refuses (impossible
    /// under the mask) leaves the matcher failed, which then allows only end of sequence.
    pub fn accept(&mut self, token: u32) {
        if self.eos.contains(&token) || self.matcher.is_stopped() {
            return;
        }
        let _ = self.matcher.consume_token(token);
    }

    /// Whether the grammar can go no further (only end of sequence is allowed).
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod tests;
