//! Progress bars on stderr, hidden when asked or when stderr is not a terminal.
use indicatif::{ProgressBar, ProgressStyle};

pub fn bar(len: u64, what: &str, hidden: bool) -> ProgressBar {
    if hidden || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    let style = ProgressStyle::with_template(
        "{msg} {bar:40} {pos}/{len} [{elapsed_precise}<{eta_precise}]",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    pb.set_style(style);
    pb.set_message(what.to_string());
    pb
}
