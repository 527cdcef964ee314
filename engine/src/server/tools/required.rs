//! The output of `tool_choice: "required"`, constrained to vLLM's JSON array of
//! `{"name": ..., "parameters": {...}}` calls: read as it streams, each call released once
//! its object is complete. Only an output cut short (by `max_tokens`) can break the
//! array; from the first item that is not a complete call on, the rest is content.
use super::json::{call_from_object, GrowingScan, Scan};
use super::{BufferedParser, ToolDelta};

#[derive(Debug, Default)]
pub struct RequiredParser {
    /// The text not yet released: from the output's start until the first call, then from
    /// the end of the last call.
    buf: String,
    /// Where reading resumes in `buf`.
    pos: usize,
    /// The scan of the value at `pos`.
    scan: GrowingScan,
    /// Past the opening `[`.
    opened: bool,
    closed: bool,
    calls: usize,
    content: bool,
}

impl RequiredParser {
    fn read(&mut self, out: &mut ToolDelta, at_end: bool) {
        loop {
            if self.content {
                out.content.push_str(&std::mem::take(&mut self.buf));
                return;
            }
            let rest = &self.buf[self.pos..];
            let t = rest.trim_start();
            let skip = rest.len() - t.len();
            if self.closed {
                // The grammar ends the output here; anything else is content.
                if !t.is_empty() {
                    self.content = true;
                    continue;
                }
                if at_end {
                    self.buf.clear();
                }
                return;
            }
            if t.is_empty() {
                if at_end {
                    self.content = true;
                    continue;
                }
                return;
            }
            let first = t.as_bytes()[0];
            if !self.opened {
                if first != b'[' {
                    self.content = true;
                    continue;
                }
                self.opened = true;
                self.pos += skip + 1;
                self.scan = GrowingScan::default();
                continue;
            }
            if self.calls > 0 && (first == b',' || first == b']') {
                if first == b']' {
                    self.closed = true;
                }
                self.pos += skip + 1;
                self.scan = GrowingScan::default();
                continue;
            }
            if self.calls == 0 && first == b']' {
                self.content = true;
                continue;
            }
            match self.scan.scan(rest) {
                Scan::Complete(n) if first == b'{' => {
                    match call_from_object(&rest[..n], &["parameters"]) {
                        Some(call) => {
                            out.calls.push(call);
                            self.calls += 1;
                            self.buf.drain(..self.pos + n);
                            self.pos = 0;
                            self.scan = GrowingScan::default();
                        }
                        None => self.content = true,
                    }
                }
                Scan::Incomplete if !at_end => return,
                _ => self.content = true,
            }
        }
    }
}

impl BufferedParser for RequiredParser {
    fn buffer(&mut self) -> &mut String {
        &mut self.buf
    }

    fn step(&mut self, out: &mut ToolDelta, at_end: bool) {
        self.read(out, at_end)
    }
}
