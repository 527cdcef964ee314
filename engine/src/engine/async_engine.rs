//! The engine behind the server: one thread owns the `EngineCore` (invariant 5); requests,
//! aborts and outputs cross over channels. Text is made on the consumer's side, in
//! `RequestStream`, so the engine thread spends its time on the model.
use std::collections::HashMap;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::Result;
use tokio::sync::mpsc as tmpsc;

use super::args::EngineArgs;
use super::core::EngineCore;
use super::output::{CompletionDelta, SeqOutput};
use super::request::{admit, EngineError};
use crate::sampling::SamplingParams;
use crate::scheduler::{EngineCoreOutput, EngineRequest, FinishReason, RequestId};
use crate::tokenizer::Tokenizer;

/// The failure that requests still running get when the engine stops (the server's grace
/// period ran out); the server answers it with 503, as it does a request refused at shutdown.
pub const SHUT_DOWN_MESSAGE: &str = "the server shut down before this request finished";

/// A snapshot of the engine's counters, for /metrics.
#[derive(Debug, Clone, Default)]
pub struct EngineStats {
    pub num_running: usize,
    pub num_waiting: usize,
    pub kv_usage: f32,
    pub num_free_blocks: usize,
    pub num_total_blocks: usize,
    pub num_preemptions: u64,
    pub prompt_tokens_total: u64,
    pub generation_tokens_total: u64,
    /// Prefix-cache lookups and hits, in tokens (vLLM's prefix_cache_queries / _hits).
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
    /// How the runner's steps ran (`Executor::step_counts`).
    pub steps: crate::runner::StepCounts,
}

enum Command {
    Add {
        reqs: Vec<EngineRequest>,
        sink: tmpsc::UnboundedSender<(usize, CoreEvent)>,
    },
    Abort(Vec<RequestId>),
    Shutdown,
}

enum CoreEvent {
    Output(EngineCoreOutput),
    Failed(String),
    ShutDown,
}

struct Shared {
    commands: Mutex<mpsc::Sender<Command>>,
    stats: Mutex<EngineStats>,
    accepting: std::sync::atomic::AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Clone)]
pub struct AsyncEngine {
    shared: Arc<Shared>,
    tokenizer: Option<Arc<Tokenizer>>,
    model_name: Arc<str>,
    max_model_len: usize,
    eos_token_ids: Arc<[u32]>,
    vocab_size: usize,
    structured: crate::sampling::structured::StructuredSupport,
}

impl AsyncEngine {
    /// Load the model (blocking) and start the engine thread.
    pub fn start(args: &EngineArgs) -> Result<AsyncEngine> {
        let (core, tokenizer) = EngineCore::new(args)?;
        let max_model_len = core.max_model_len;
        let eos_token_ids: Arc<[u32]> = core.config.eos_token_ids.clone().into();
        let vocab_size = core.config.vocab_size;
        let structured = core.structured.clone();
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            commands: Mutex::new(tx),
            stats: Mutex::new(EngineStats::default()),
            accepting: std::sync::atomic::AtomicBool::new(true),
            thread: Mutex::new(None),
        });
        // /metrics reads these before the first step publishes any (free blocks included).
        publish_stats(&core, &shared);
        let thread_shared = shared.clone();
        let handle = std::thread::Builder::new()
            .name("rvllm-engine".into())
            .spawn(move || engine_loop(core, rx, &thread_shared))?;
        *shared.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        Ok(AsyncEngine {
            shared,
            tokenizer: tokenizer.map(Arc::new),
            model_name: args
                .served_model_name
                .clone()
                .unwrap_or_else(|| args.model.clone())
                .into(),
            max_model_len,
            eos_token_ids,
            vocab_size,
            structured,
        })
    }

    pub fn tokenizer(&self) -> Option<Arc<Tokenizer>> {
        self.tokenizer.clone()
    }

    pub fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    /// Validate and submit a request; `n > 1` fans out into independent sequences.
    pub fn generate(
        &self,
        prompt_token_ids: Vec<u32>,
        params: SamplingParams,
    ) -> Result<RequestStream, EngineError> {
        if !self
            .shared
            .accepting
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Err(EngineError::ShuttingDown);
        }
        crate::sampling::structured::check_request(&self.structured, &params).map_err(|e| {
            EngineError::InvalidParam {
                param: e.param.to_string(),
                message: e.message,
            }
        })?;
        let (params, reqs) = admit(
            &prompt_token_ids,
            &params,
            self.max_model_len,
            self.vocab_size,
            &self.eos_token_ids,
        )?;
        let (sink, events) = tmpsc::unbounded_channel();
        let children = SeqOutput::for_request(
            reqs.len(),
            self.tokenizer.clone(),
            &prompt_token_ids,
            &params,
        );
        let ids: Vec<RequestId> = reqs.iter().map(|r| r.req_id).collect();
        self.send(Command::Add { reqs, sink })
            .map_err(|_| EngineError::ShuttingDown)?;
        Ok(RequestStream {
            events,
            children,
            ids,
            engine: self.shared.clone(),
        })
    }

    pub fn stats(&self) -> EngineStats {
        self.shared
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stop taking requests; running ones go on until they finish.
    pub fn stop_accepting(&self) {
        self.shared
            .accepting
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Stop the engine thread (aborting whatever still runs) and wait for it.
    pub fn shutdown(&self) {
        self.stop_accepting();
        let _ = self.send(Command::Shutdown);
        if let Some(h) = self
            .shared
            .thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = h.join();
        }
    }

    fn send(&self, c: Command) -> Result<(), ()> {
        self.shared
            .commands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(c)
            .map_err(|_| ())
    }
}

/// The outputs of one user request. Dropping it aborts whatever is unfinished, which frees
/// the KV blocks (a client that disconnects mid-stream).
pub struct RequestStream {
    events: tmpsc::UnboundedReceiver<(usize, CoreEvent)>,
    children: Vec<SeqOutput>,
    ids: Vec<RequestId>,
    engine: Arc<Shared>,
}

impl RequestStream {
    pub fn request_id(&self) -> u64 {
        self.ids[0]
    }

    /// The next delta of any of the request's sequences; None once all have finished.
    pub async fn next(&mut self) -> Option<CompletionDelta> {
        loop {
            if self.children.iter().all(|c| c.finished) {
                return None;
            }
            let (index, event) = self.events.recv().await?;
            let child = &mut self.children[index];
            if child.finished {
                continue;
            }
            match event {
                CoreEvent::Output(out) => {
                    let (delta, stopped) = child.process(out);
                    if stopped {
                        let _ = self.abort_ids(vec![self.ids[index]]);
                    }
                    return Some(delta);
                }
                CoreEvent::Failed(msg) => {
                    child.finished = true;
                    return Some(aborted(index, format!("engine error: {msg}")));
                }
                CoreEvent::ShutDown => {
                    child.finished = true;
                    return Some(aborted(index, SHUT_DOWN_MESSAGE.into()));
                }
            }
        }
    }

    fn abort_ids(&self, ids: Vec<RequestId>) -> Result<(), ()> {
        let guard = self
            .engine
            .commands
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        guard.send(Command::Abort(ids)).map_err(|_| ())
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        let unfinished: Vec<RequestId> = self
            .children
            .iter()
            .zip(&self.ids)
            .filter(|(c, _)| !c.finished)
            .map(|(_, id)| *id)
            .collect();
        if !unfinished.is_empty() {
            let _ = self.abort_ids(unfinished);
        }
    }
}

/// The last delta of a sequence the engine gave up on, carrying why.
fn aborted(index: usize, why: String) -> CompletionDelta {
    CompletionDelta {
        index,
        finish_reason: Some(FinishReason::Abort),
        text: String::new(),
        stop_reason: Some(super::output::StopReason::Str(why)),
        ..Default::default()
    }
}

type Route = (tmpsc::UnboundedSender<(usize, CoreEvent)>, usize);

fn engine_loop(mut core: EngineCore, rx: mpsc::Receiver<Command>, shared: &Shared) {
    let mut routes: HashMap<RequestId, Route> = HashMap::new();
    loop {
        // Block for work when idle; otherwise take what has arrived and step.
        let mut cmds = Vec::new();
        if !core.has_unfinished() {
            match rx.recv() {
                Ok(c) => cmds.push(c),
                Err(_) => return,
            }
        }
        cmds.extend(rx.try_iter());
        for cmd in cmds {
            match cmd {
                Command::Add { reqs, sink } => {
                    for (index, req) in reqs.into_iter().enumerate() {
                        let id = req.req_id;
                        let sink_c = sink.clone();
                        if let Err(msg) = core.add_request(req) {
                            let _ = sink_c.send((index, CoreEvent::Failed(msg)));
                        } else {
                            routes.insert(id, (sink_c, index));
                        }
                    }
                }
                Command::Abort(ids) => {
                    for id in ids {
                        core.abort(id);
                        routes.remove(&id);
                    }
                }
                Command::Shutdown => {
                    for (_, (sink, index)) in routes.drain() {
                        let _ = sink.send((index, CoreEvent::ShutDown));
                    }
                    return;
                }
            }
        }
        if !core.has_unfinished() {
            publish_stats(&core, shared);
            continue;
        }
        match core.step() {
            Ok(outputs) => {
                for out in outputs {
                    let id = out.req_id;
                    let finished = out.finish_reason.is_some();
                    let gone = match routes.get(&id) {
                        Some((sink, index)) => sink.send((*index, CoreEvent::Output(out))).is_err(),
                        None => false,
                    };
                    if gone && !finished {
                        core.abort(id); // the consumer is gone: free its blocks now
                    }
                    if finished || gone {
                        routes.remove(&id);
                    }
                }
            }
            Err(e) => {
                // A failed step fails every request in it; the engine keeps serving others.
                let msg = format!("{e:#}");
                eprintln!("rvllm: engine step failed: {msg}");
                for (id, (sink, index)) in routes.drain() {
                    core.abort(id);
                    let _ = sink.send((index, CoreEvent::Failed(msg.clone())));
                }
            }
        }
        publish_stats(&core, shared);
    }
}

fn publish_stats(core: &EngineCore, shared: &Shared) {
    let s = &core.scheduler;
    let stats = EngineStats {
        num_running: s.num_running(),
        num_waiting: s.num_waiting(),
        kv_usage: s.kv_usage(),
        num_free_blocks: s.num_free_blocks(),
        num_total_blocks: core.executor.num_kv_blocks(),
        num_preemptions: s.num_preemptions(),
        prompt_tokens_total: core.prompt_tokens_total,
        generation_tokens_total: core.generation_tokens_total,
        prefix_cache_queries: s.prefix_cache_queries(),
        prefix_cache_hits: s.prefix_cache_hits(),
        steps: core.executor.step_counts(),
    };
    *shared.stats.lock().unwrap_or_else(|e| e.into_inner()) = stats;
}
