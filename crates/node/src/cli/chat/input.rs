//! A one-line text editor: the input line and the fields of the login form.

/// Most characters an input line holds (the server's body limit is 16 KiB).
pub const INPUT_CHARS_MAX: usize = 16 * 1024;

/// Text and a cursor (a character index).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Input {
    text: String,
    cursor: usize,
}

impl Input {
    /// The text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The text before the cursor.
    pub fn before_cursor(&self) -> &str {
        &self.text[..self.byte_at(self.cursor)]
    }

    /// Whether there is no text.
    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    /// Type `c` at the cursor (ignored once the line is full).
    pub fn insert(&mut self, c: char) {
        if self.text.chars().count() >= INPUT_CHARS_MAX || c.is_control() {
            return;
        }
        let at = self.byte_at(self.cursor);
        self.text.insert(at, c);
        self.cursor += 1;
    }

    /// Delete the character before the cursor.
    pub fn backspace(&mut self) {
        if self.cursor == 0 {
            return;
        }
        self.cursor -= 1;
        let at = self.byte_at(self.cursor);
        self.text.remove(at);
    }

    /// Delete the character under the cursor.
    pub fn delete(&mut self) {
        if self.cursor < self.text.chars().count() {
            let at = self.byte_at(self.cursor);
            self.text.remove(at);
        }
    }

    /// Move the cursor one character left.
    pub fn left(&mut self) {
        self.cursor = self.cursor.saturating_sub(1);
    }

    /// Move the cursor one character right.
    pub fn right(&mut self) {
        self.cursor = (self.cursor + 1).min(self.text.chars().count());
    }

    /// Move the cursor to the start.
    pub fn home(&mut self) {
        self.cursor = 0;
    }

    /// Move the cursor to the end.
    pub fn end(&mut self) {
        self.cursor = self.text.chars().count();
    }

    /// Take the text, leaving the line empty.
    pub fn take(&mut self) -> String {
        self.cursor = 0;
        std::mem::take(&mut self.text)
    }

    fn byte_at(&self, chars: usize) -> usize {
        self.text.char_indices().nth(chars).map_or(self.text.len(), |(at, _)| at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn editing_moves_the_cursor_by_characters() {
        let mut input = Input::default();
        for c in "héllo".chars() {
            input.insert(c);
        }
        input.left();
        input.left();
        input.backspace();
        assert_eq!(input.text(), "hélo");
        assert_eq!(input.before_cursor(), "hé");
        input.delete();
        assert_eq!(input.text(), "héo");
        input.home();
        input.insert('>');
        input.end();
        input.insert('!');
        input.right();
        assert_eq!(input.text(), ">héo!");
        input.insert('\u{7}');
        assert_eq!(input.take(), ">héo!", "control characters are not typed");
        assert!(input.is_empty());
        input.backspace();
        input.delete();
        assert_eq!(input.before_cursor(), "");
    }

    #[test]
    fn a_line_holds_at_most_its_limit() {
        let mut input = Input::default();
        for _ in 0..INPUT_CHARS_MAX + 5 {
            input.insert('x');
        }
        assert_eq!(input.text().len(), INPUT_CHARS_MAX);
    }
}
