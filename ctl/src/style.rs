//! Colours on a terminal: on when the stream is a TTY, off when it is
//! piped, when `NO_COLOR` is set to anything non-empty (no-color.org) or
//! when `TERM=dumb`. Only the 8 basic ANSI colours, which every terminal
//! (and every ssh session) shows.

use std::io::IsTerminal;

/// Whether to colour, decided once per stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Style {
    on: bool,
}

/// A colour for [`Style::paint`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Colour {
    /// Failures.
    Red,
    /// Success.
    Green,
    /// Waiting, paused, warnings.
    Yellow,
    /// The daemon's own notes.
    Cyan,
    /// Less important text.
    Dim,
}

impl Style {
    /// For stdout.
    pub fn stdout() -> Style {
        Style::decide(std::io::stdout().is_terminal())
    }

    /// For stderr.
    pub fn stderr() -> Style {
        Style::decide(std::io::stderr().is_terminal())
    }

    /// No colours.
    pub fn plain() -> Style {
        Style { on: false }
    }

    fn decide(tty: bool) -> Style {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let dumb = std::env::var_os("TERM").is_some_and(|t| t == "dumb");
        Style {
            on: tty && !no_color && !dumb,
        }
    }

    /// Whether colours are on.
    pub fn on(self) -> bool {
        self.on
    }

    /// `text` in `colour`, or as it is.
    pub fn paint(self, colour: Colour, text: &str) -> String {
        if !self.on {
            return text.to_string();
        }
        let code = match colour {
            Colour::Red => "31",
            Colour::Green => "32",
            Colour::Yellow => "33",
            Colour::Cyan => "36",
            Colour::Dim => "2",
        };
        format!("\x1b[{code}m{text}\x1b[0m")
    }

    /// A job, pool or worker state in its colour (red for what went wrong,
    /// yellow for what waits, green for success).
    pub fn state(self, state: &str) -> String {
        self.state_cell(state, 0)
    }

    /// [`Style::state`] padded to `width` columns first (escape codes take
    /// no room on the screen, so they must not count in the padding).
    pub fn state_cell(self, state: &str, width: usize) -> String {
        let cell = format!("{state:<width$}");
        let colour = match state {
            "failed" | "dead" | "timed_out" | "cancelled" | "backoff" => Colour::Red,
            "queued" | "paused" | "starting" | "stopping" => Colour::Yellow,
            "succeeded" | "running" | "ready" | "busy" => Colour::Green,
            _ => return cell,
        };
        self.paint(colour, &cell)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_is_plain_and_on_paints() {
        assert_eq!(Style::plain().paint(Colour::Red, "x"), "x");
        assert_eq!(Style::plain().state("failed"), "failed");
        let on = Style { on: true };
        assert_eq!(on.paint(Colour::Red, "x"), "\x1b[31mx\x1b[0m");
        assert_eq!(on.state("succeeded"), "\x1b[32msucceeded\x1b[0m");
        assert_eq!(on.state("other"), "other");
        assert_eq!(on.state_cell("dead", 6), "\x1b[31mdead  \x1b[0m");
        assert_eq!(Style::plain().state_cell("dead", 6), "dead  ");
    }
}
