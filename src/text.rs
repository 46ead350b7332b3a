//! Text from a file (tensor names, paths, messages quoting the header) made safe to print on one
//! terminal line: control characters escaped, and cut to a readable length.
//!
//! A header may name a tensor with 50 MB of characters, or with ESC and CR that would rewrite
//! the user's terminal (a forged "OK" line, a changed window title). Every error message and
//! every table row that shows such text goes through [`for_display`].

use std::borrow::Cow;
use std::fmt::Write as _;
use std::path::Path;

/// The most bytes of one piece of file-supplied text an error message shows.
pub const MAX_SHOWN_BYTES: usize = 200;

/// `s` with control characters escaped (as [`escape_controls`] does) and cut after
/// [`MAX_SHOWN_BYTES`] bytes of output, with a marker saying how many bytes of `s` were left
/// out: `abc…(12345 more bytes)`. Work and memory are bounded by the shown length, whatever the
/// length of `s`.
///
/// ```
/// use weightstream::text::for_display;
/// assert_eq!(for_display("w\u{1b}]0;pwned\u{7}"), "w\\x1b]0;pwned\\x07");
/// let long = "x".repeat(50_000);
/// assert_eq!(for_display(&long), format!("{}…(49800 more bytes)", "x".repeat(200)));
/// ```
pub fn for_display(s: &str) -> Cow<'_, str> {
    for_display_within(s, MAX_SHOWN_BYTES)
}

/// [`for_display`] with another limit than [`MAX_SHOWN_BYTES`]: for messages that quote a name
/// and say more about it (a parser's message with its line and column).
pub fn for_display_within(s: &str, max_bytes: usize) -> Cow<'_, str> {
    if s.len() <= max_bytes && !s.chars().any(is_terminal_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(max_bytes.min(s.len()) + 32);
    let mut consumed = 0;
    let mut escaped = String::new();
    for c in s.chars() {
        escaped.clear();
        push_escaped(&mut escaped, c);
        if out.len() + escaped.len() > max_bytes {
            break;
        }
        out.push_str(&escaped);
        consumed += c.len_utf8();
    }
    if consumed < s.len() {
        // Writing to a String cannot fail.
        let _ = write!(out, "…({} more bytes)", s.len() - consumed);
    }
    Cow::Owned(out)
}

/// The most bytes of a message quoting file-supplied text (with [`for_display_within`]).
pub const MAX_SHOWN_MESSAGE_BYTES: usize = 1000;

/// A path as [`for_display`] shows text (lossy for non-UTF-8 names).
pub fn path_for_display(p: &Path) -> String {
    let shown = p.to_string_lossy();
    for_display(&shown).into_owned()
}

/// Whether printing `c` raw could move the cursor, change colours or the window title, or
/// reorder what the terminal shows: C0 and C1 controls, DEL, and the Unicode bidirectional
/// overrides and isolates.
fn is_terminal_control(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}')
}

/// `s` with every terminal control character written as an escape: `\x1b` for ESC, `\r`, `\n`,
/// `\t` for those, `\u{202e}` above U+007F. Backslashes are left as they are, so the escapes
/// are for a reader, not a round trip.
pub fn escape_controls(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_terminal_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        push_escaped(&mut out, c);
    }
    Cow::Owned(out)
}

/// Append `c` to `out`, escaped when it is a terminal control.
fn push_escaped(out: &mut String, c: char) {
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        // Writing to a String cannot fail.
        c if is_terminal_control(c) && (c as u32) < 0x80 => {
            let _ = write!(out, "\\x{:02x}", c as u32);
        }
        c if is_terminal_control(c) => {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
        c => out.push(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_borrowed_unchanged() {
        assert!(matches!(for_display("model.layers.0.weight"), Cow::Borrowed("model.layers.0.weight")));
    }

    #[test]
    fn controls_are_escaped() {
        assert_eq!(escape_controls("a\u{1b}]0;x\u{7}\rOK\\"), "a\\x1b]0;x\\x07\\rOK\\");
        assert_eq!(escape_controls("\u{9b}31m\u{202e}"), "\\u{9b}31m\\u{202e}");
    }

    #[test]
    fn long_text_is_cut_on_a_char_boundary_with_a_marker() {
        let long = "é".repeat(1000); // 2000 bytes
        let shown = for_display(&long);
        assert!(shown.starts_with(&"é".repeat(100)));
        assert!(shown.ends_with("…(1800 more bytes)"), "{shown}");
        let odd = format!("x{}", "é".repeat(1000));
        assert!(for_display(&odd).ends_with("…(1802 more bytes)"));
    }
}
