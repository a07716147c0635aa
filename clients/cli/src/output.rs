//! Writing to stdout and stderr without `println!`'s panic when the reader has gone
//! (`gateway list | head -1`): a closed pipe ends the output, not the program.

use std::io::Write;

/// `text` and a newline on stdout.
pub fn out(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{text}").and_then(|_| stdout.flush());
}

/// `text` and a newline on stderr.
pub fn err(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

/// A JSON body as `--json` prints it.
pub fn json(value: &serde_json::Value) {
    out(&serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string()));
}
