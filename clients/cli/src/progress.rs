//! What `--wait` shows on stderr while the job runs: an indicatif spinner and bar on a
//! terminal, plain lines (one per change) otherwise, so logs and scripts can read them.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

use crate::render;

const SPINNER: &str = "{spinner} {elapsed:>4} {msg}";
const BAR: &str = "{spinner} {elapsed:>4} [{bar:30}] {msg}";

pub enum Reporter {
    Bar(ProgressBar),
    Lines { last: String },
}

impl Reporter {
    /// A bar when stderr is a terminal. `first` is the job as accepted, already announced.
    pub fn new(first: &Value) -> Self {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(100), ProgressDrawTarget::stderr());
            bar.set_style(style(SPINNER));
            bar.enable_steady_tick(Duration::from_millis(120));
            let reporter = Reporter::Bar(bar);
            reporter.show(first);
            reporter
        } else {
            Reporter::Lines {
                last: render::progress_line(first),
            }
        }
    }

    pub fn update(&mut self, job: &Value) {
        match self {
            Reporter::Bar(_) => self.show(job),
            Reporter::Lines { last } => {
                let line = render::progress_line(job);
                if line != *last {
                    crate::output::err(&line);
                    *last = line;
                }
            }
        }
    }

    fn show(&self, job: &Value) {
        if let Reporter::Bar(bar) = self {
            match render::percent(job).filter(|_| !render::is_terminal(job)) {
                Some(percent) => {
                    bar.set_style(style(BAR));
                    bar.set_position(percent);
                }
                None => bar.set_style(style(SPINNER)),
            }
            bar.set_message(render::progress_line(job));
        }
    }

    /// A line that must not be drawn over (a retry after a network blip).
    pub fn note(&self, line: &str) {
        match self {
            Reporter::Bar(bar) => bar.suspend(|| crate::output::err(line)),
            Reporter::Lines { .. } => crate::output::err(line),
        }
    }

    /// Takes the bar off the screen; the caller prints the outcome.
    pub fn finish(self) {
        if let Reporter::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

fn style(template: &str) -> ProgressStyle {
    // The templates are constants (a unit test parses them); a spinner is the fallback all
    // the same, so no path here can panic.
    ProgressStyle::with_template(template)
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_templates_parse() {
        for template in [SPINNER, BAR] {
            assert!(ProgressStyle::with_template(template).is_ok(), "{template}");
        }
    }
}
