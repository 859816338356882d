//! What a line typed into the input means: a post, or a `/command`.
//!
//! Parsing is a pure function of the line, so every command and every mistake is covered by
//! the table test below. Messages are named by their *handle*, the number the chat view shows
//! in brackets left of each message (see [`super::state`]).

/// The help text `/help` shows, one command a line.
pub const HELP: &[&str] = &[
    "/join ROOM        join an existing room and switch to it",
    "/create ROOM      create a room (you own it) and switch to it",
    "/leave            leave the current room",
    "/room ROOM        switch to a joined room (or Tab, Shift-Tab, Up, Down)",
    "/history          load an older page of the current room (PageUp/PageDown scroll)",
    "/react N EMOJI    react to message N (N: the number in brackets left of it)",
    "/unreact N EMOJI  take your reaction back",
    "/edit N TEXT      replace the text of your message N",
    "/redact N         redact message N",
    "/quit             leave the chat (or Ctrl-C)",
    "//TEXT            post TEXT starting with one '/'; any other line is posted as it is",
];

/// A parsed input line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Post the text to the current room.
    Post(String),
    /// Join an existing room.
    Join(String),
    /// Create a room.
    Create(String),
    /// Leave the current room.
    Leave,
    /// Switch to a joined room.
    Room(String),
    /// Load an older page of the current room.
    History,
    /// React to (or, with `remove`, take back a reaction to) the message with this handle.
    React { handle: u64, reaction: String, remove: bool },
    /// Replace the body of the message with this handle.
    Edit { handle: u64, body: String },
    /// Redact the message with this handle.
    Redact { handle: u64 },
    /// Show the commands.
    Help,
    /// Exit.
    Quit,
}

/// Parse one input line. `Ok(None)`: nothing to do (a blank line). `Err`: what is wrong with
/// the command, for the status line.
pub fn parse(line: &str) -> Result<Option<Command>, String> {
    if line.trim().is_empty() {
        return Ok(None);
    }
    if let Some(literal) = line.strip_prefix("//") {
        return Ok(Some(Command::Post(format!("/{literal}"))));
    }
    let Some(command_line) = line.strip_prefix('/') else {
        return Ok(Some(Command::Post(line.to_owned())));
    };
    let (name, rest) = match command_line.split_once(char::is_whitespace) {
        Some((name, rest)) => (name, rest.trim()),
        None => (command_line, ""),
    };
    let command = match name {
        "join" => Command::Join(one_word(rest, "/join ROOM")?),
        "create" => Command::Create(one_word(rest, "/create ROOM")?),
        "room" => Command::Room(one_word(rest, "/room ROOM")?),
        "leave" => no_arguments(rest, "/leave", Command::Leave)?,
        "history" => no_arguments(rest, "/history", Command::History)?,
        "help" => no_arguments(rest, "/help", Command::Help)?,
        "quit" | "exit" => no_arguments(rest, "/quit", Command::Quit)?,
        "react" | "unreact" => {
            let usage = if name == "react" { "/react N EMOJI" } else { "/unreact N EMOJI" };
            let (handle, reaction) = handle_and_text(rest, usage)?;
            Command::React { handle, reaction: one_word(&reaction, usage)?, remove: name == "unreact" }
        }
        "edit" => {
            let (handle, body) = handle_and_text(rest, "/edit N TEXT")?;
            Command::Edit { handle, body }
        }
        "redact" => Command::Redact { handle: handle(rest, "/redact N")? },
        _ => return Err(format!("unknown command /{name}; /help lists them (start with // to post a '/')")),
    };
    Ok(Some(command))
}

fn one_word(rest: &str, usage: &str) -> Result<String, String> {
    match rest.split_whitespace().collect::<Vec<_>>().as_slice() {
        [word] => Ok((*word).to_owned()),
        _ => Err(format!("usage: {usage}")),
    }
}

fn no_arguments(rest: &str, usage: &str, command: Command) -> Result<Command, String> {
    if rest.is_empty() { Ok(command) } else { Err(format!("usage: {usage}")) }
}

fn handle(word: &str, usage: &str) -> Result<u64, String> {
    let word = word.trim().trim_start_matches('#');
    word.parse::<u64>().map_err(|_| format!("usage: {usage} (N: the number in brackets left of a message)"))
}

fn handle_and_text(rest: &str, usage: &str) -> Result<(u64, String), String> {
    let Some((first, text)) = rest.split_once(char::is_whitespace) else {
        return Err(format!("usage: {usage}"));
    };
    let text = text.trim();
    if text.is_empty() {
        return Err(format!("usage: {usage}"));
    }
    Ok((handle(first, usage)?, text.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_into_commands() {
        let post = |s: &str| Ok(Some(Command::Post(s.to_owned())));
        let cases: Vec<(&str, Result<Option<Command>, String>)> = vec![
            ("", Ok(None)),
            ("   ", Ok(None)),
            ("hello there", post("hello there")),
            ("  indented stays", post("  indented stays")),
            ("//slash at start", post("/slash at start")),
            ("/join general", Ok(Some(Command::Join("general".into())))),
            ("/join   general  ", Ok(Some(Command::Join("general".into())))),
            ("/create ops", Ok(Some(Command::Create("ops".into())))),
            ("/room ops", Ok(Some(Command::Room("ops".into())))),
            ("/leave", Ok(Some(Command::Leave))),
            ("/history", Ok(Some(Command::History))),
            ("/help", Ok(Some(Command::Help))),
            ("/quit", Ok(Some(Command::Quit))),
            ("/exit", Ok(Some(Command::Quit))),
            ("/react 3 +1", Ok(Some(Command::React { handle: 3, reaction: "+1".into(), remove: false }))),
            ("/react #3 🎉", Ok(Some(Command::React { handle: 3, reaction: "🎉".into(), remove: false }))),
            ("/unreact 3 +1", Ok(Some(Command::React { handle: 3, reaction: "+1".into(), remove: true }))),
            ("/edit 12 fixed  typo", Ok(Some(Command::Edit { handle: 12, body: "fixed  typo".into() }))),
            ("/redact 4", Ok(Some(Command::Redact { handle: 4 }))),
        ];
        for (line, want) in cases {
            assert_eq!(parse(line), want, "{line:?}");
        }
    }

    #[test]
    fn mistakes_say_what_is_expected() {
        let cases = [
            ("/join", "usage: /join ROOM"),
            ("/join a b", "usage: /join ROOM"),
            ("/leave now", "usage: /leave"),
            ("/react 3", "usage: /react N EMOJI"),
            ("/react x +1", "usage: /react N EMOJI"),
            ("/react 3 two words", "usage: /react N EMOJI"),
            ("/edit 3", "usage: /edit N TEXT"),
            ("/edit three text", "usage: /edit N TEXT"),
            ("/redact", "usage: /redact N"),
            ("/frobnicate", "unknown command /frobnicate"),
        ];
        for (line, want) in cases {
            let error = parse(line).expect_err(line);
            assert!(error.starts_with(want), "{line:?}: {error:?}");
        }
    }
}
