//! Drawing the full-screen client: a pure function from the client's state to a ratatui frame,
//! so the layout is tested on ratatui's `TestBackend` without a terminal.
//!
//! ```text
//! ┌ Rooms ───────────┐┌ general ──────────────────────────────────┐
//! │> general         ││                                            │
//! │  random (3)      ││[1] 12:01 olga: hello                       │
//! │ not joined:      ││[2] 12:02 bob: hi there (edited)            │
//! │  lobby           ││      +1 olga                               │
//! └──────────────────┘└────────────────────────────────────────────┘
//! status line: the last error or notice, else who is typing
//! > input line
//! ```
//!
//! Times are UTC (HH:MM of the message's position). A room being caught up shows `…` after its
//! name, one resubscribing `!`.

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph};
use unicode_width::UnicodeWidthChar;

use super::command::HELP;
use super::input::Input;
use super::state::{ChatState, Link, RoomView, ShownMessage};

/// Columns of the room list.
pub const ROOM_LIST_COLUMNS: u16 = 24;

/// The status line: nothing, a notice, or an error.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Status {
    /// Nothing to say.
    #[default]
    None,
    /// A notice.
    Info(String),
    /// Something failed.
    Error(String),
}

/// What the chat screen shows.
#[derive(Debug)]
pub struct ChatScreen<'a> {
    /// The rooms and messages.
    pub state: &'a ChatState,
    /// The input line.
    pub input: &'a Input,
    /// The status line.
    pub status: &'a Status,
    /// Lines scrolled back from the newest message.
    pub scroll_lines: usize,
    /// Show the commands instead of the messages.
    pub help: bool,
    /// Who is connected where, for the title.
    pub title: &'a str,
}

/// What the login form shows.
#[derive(Debug)]
pub struct LoginScreen<'a> {
    /// The node's address.
    pub addr: &'a str,
    /// The user name typed.
    pub user: &'a Input,
    /// The password typed (shown masked).
    pub password: &'a Input,
    /// Whether the password field has the cursor.
    pub on_password: bool,
    /// Whether Enter registers before logging in.
    pub register: bool,
    /// The status line.
    pub status: &'a Status,
}

/// Draw the chat screen.
pub fn draw_chat(frame: &mut Frame, screen: &ChatScreen) {
    let [main, status_area, input_area] =
        Layout::vertical([Constraint::Min(3), Constraint::Length(1), Constraint::Length(1)]).areas(frame.area());
    let [rooms_area, messages_area] =
        Layout::horizontal([Constraint::Length(ROOM_LIST_COLUMNS), Constraint::Min(10)]).areas(main);

    frame.render_widget(room_list(screen.state, rooms_area.height), rooms_area);

    let title = match screen.state.current() {
        Some(room) if room.title.is_empty() || room.title == room.name => format!(" {} — {} ", room.name, screen.title),
        Some(room) => format!(" {} ({}) — {} ", room.name, room.title, screen.title),
        None => format!(" no room: /join ROOM or /create ROOM — {} ", screen.title),
    };
    let block = Block::bordered().title(title);
    let inner = block.inner(messages_area);
    let lines = if screen.help {
        let mut lines = vec![Line::styled("Commands (Esc closes):", Style::new().add_modifier(Modifier::BOLD))];
        lines.extend(HELP.iter().map(|line| Line::raw(*line)));
        lines
    } else {
        let width = usize::from(inner.width);
        let all: Vec<Line> = match screen.state.current() {
            Some(room) => room.messages().flat_map(|m| message_lines(m, &screen.state.me, width)).collect(),
            None => Vec::new(),
        };
        let height = usize::from(inner.height);
        let scroll = screen.scroll_lines.min(all.len().saturating_sub(height));
        let end = all.len() - scroll;
        let start = end.saturating_sub(height);
        // The newest message sits on the bottom line, next to the input.
        let mut shown = vec![Line::default(); height.saturating_sub(end - start)];
        shown.extend_from_slice(&all[start..end]);
        shown
    };
    frame.render_widget(Paragraph::new(lines).block(block), messages_area);

    frame.render_widget(status_line(screen.status, screen.state.current()), status_area);
    draw_input(frame, input_area, "> ", screen.input.text(), screen.input.before_cursor());
}

/// Draw the login form.
pub fn draw_login(frame: &mut Frame, screen: &LoginScreen) {
    let area = frame.area();
    let [_, form, _] = Layout::vertical([Constraint::Fill(1), Constraint::Length(8), Constraint::Fill(1)]).areas(area);
    let [_, form, _] =
        Layout::horizontal([Constraint::Fill(1), Constraint::Length(60), Constraint::Fill(1)]).areas(form);
    let action = if screen.register { "register and log in" } else { "log in" };
    let block = Block::bordered().title(format!(" palaver: {action} to {} ", screen.addr));
    let inner = block.inner(form);
    frame.render_widget(block, form);
    let rows = Layout::vertical([Constraint::Length(1); 6]).split(inner);
    let masked: String = "*".repeat(screen.password.text().chars().count());
    let masked_before: String = "*".repeat(screen.password.before_cursor().chars().count());
    let (user_row, password_row) = (rows[0], rows[1]);
    draw_field(frame, user_row, "User:     ", screen.user.text(), screen.user.before_cursor(), !screen.on_password);
    draw_field(frame, password_row, "Password: ", &masked, &masked_before, screen.on_password);
    let hint = "Tab: next field · Enter: go · Ctrl-R: toggle register · Esc: quit";
    frame.render_widget(Paragraph::new(Line::styled(hint, Style::new().fg(Color::DarkGray))), rows[3]);
    frame.render_widget(status_line(screen.status, None), rows[5]);
}

fn draw_field(frame: &mut Frame, area: Rect, label: &str, text: &str, before_cursor: &str, focused: bool) {
    if focused {
        draw_input(frame, area, label, text, before_cursor);
    } else {
        frame.render_widget(Paragraph::new(format!("{label}{text}")), area);
    }
}

/// An input line with `prompt`, scrolled so that the cursor shows.
fn draw_input(frame: &mut Frame, area: Rect, prompt: &str, text: &str, before_cursor: &str) {
    let prompt_columns = width_of(prompt);
    let room = usize::from(area.width).saturating_sub(prompt_columns + 1).max(1);
    let cursor_columns = width_of(before_cursor);
    // Skip characters from the left until the cursor fits.
    let mut skipped_columns = 0;
    let mut skip_chars = 0;
    for c in text.chars() {
        if cursor_columns - skipped_columns < room {
            break;
        }
        skipped_columns += c.width().unwrap_or(0);
        skip_chars += 1;
    }
    let shown: String = text.chars().skip(skip_chars).collect();
    frame.render_widget(Paragraph::new(format!("{prompt}{shown}")), area);
    let x = prompt_columns + cursor_columns - skipped_columns;
    let x = area.x.saturating_add(u16::try_from(x).unwrap_or(u16::MAX)).min(area.right().saturating_sub(1));
    frame.set_cursor_position((x, area.y));
}

fn room_list(state: &ChatState, height: u16) -> Paragraph<'static> {
    let current = state.current_name();
    let mut lines: Vec<Line> = Vec::new();
    for room in state.rooms().filter(|r| r.member) {
        let selected = current == Some(room.name.as_str());
        let marker = if selected { "> " } else { "  " };
        let link = match room.link {
            Some(Link::CatchingUp) => " …",
            Some(Link::Reconnecting) => " !",
            Some(Link::Live) | None => "",
        };
        let unread = room.unread(&state.me);
        let mut spans = vec![Span::raw(format!("{marker}{}{link}", room.name))];
        if unread > 0 && !selected {
            spans.push(Span::styled(
                format!(" ({unread})"),
                Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD),
            ));
        }
        let style = if selected { Style::new().add_modifier(Modifier::BOLD) } else { Style::new() };
        lines.push(Line::from(spans).style(style));
    }
    let others: Vec<&RoomView> = state.rooms().filter(|r| !r.member).collect();
    if !others.is_empty() && lines.len() + 2 < usize::from(height) {
        lines.push(Line::styled(" not joined:", Style::new().fg(Color::DarkGray)));
        for room in others {
            lines.push(Line::styled(format!("  {}", room.name), Style::new().fg(Color::DarkGray)));
        }
    }
    Paragraph::new(lines).block(Block::bordered().title(" Rooms "))
}

fn status_line(status: &Status, room: Option<&RoomView>) -> Paragraph<'static> {
    let line = match status {
        Status::Error(text) => Line::styled(text.clone(), Style::new().fg(Color::Red)),
        Status::Info(text) => Line::styled(text.clone(), Style::new().fg(Color::Green)),
        Status::None => match room.map(|r| r.typing.as_slice()) {
            Some([]) | None => Line::styled("/help lists the commands", Style::new().fg(Color::DarkGray)),
            Some([one]) => Line::styled(format!("{one} is typing…"), Style::new().fg(Color::DarkGray)),
            Some(many) => Line::styled(format!("{} are typing…", many.join(", ")), Style::new().fg(Color::DarkGray)),
        },
    };
    Paragraph::new(line)
}

/// A message as screen lines of at most `width` columns: `[N] HH:MM author: body`, marks, and
/// a line of reactions.
fn message_lines(message: &ShownMessage, me: &str, width: usize) -> Vec<Line<'static>> {
    let dim = Style::new().fg(Color::DarkGray);
    let mut pieces = vec![
        (format!("[{}] ", message.handle), dim),
        (format!("{} ", clock(message.position.wall_ms)), dim),
        (
            format!("{}: ", message.author),
            Style::new().fg(author_color(&message.author, me)).add_modifier(Modifier::BOLD),
        ),
    ];
    if message.redacted {
        pieces.push(("(redacted)".to_owned(), dim.add_modifier(Modifier::ITALIC)));
    } else {
        pieces.push((message.body.clone(), Style::new()));
        if message.edited {
            pieces.push((" (edited)".to_owned(), dim.add_modifier(Modifier::ITALIC)));
        }
    }
    let mut lines = wrap(&pieces, width);
    if !message.reactions.is_empty() {
        let reactions: Vec<String> =
            message.reactions.iter().map(|(reaction, users)| format!("{reaction} {}", users.join(","))).collect();
        lines.extend(wrap(&[(format!("      {}", reactions.join("  ")), Style::new().fg(Color::Cyan))], width));
    }
    lines
}

/// Styled text broken into lines of at most `width` columns, at characters (newlines in the
/// text break too).
fn wrap(pieces: &[(String, Style)], width: usize) -> Vec<Line<'static>> {
    let width = width.max(1);
    let mut lines = Vec::new();
    let mut line: Vec<Span<'static>> = Vec::new();
    let mut columns = 0;
    for (text, style) in pieces {
        let mut run = String::new();
        for c in text.chars() {
            let c_columns = if c == '\n' { 0 } else { c.width().unwrap_or(0) };
            if c == '\n' || columns + c_columns > width {
                line.push(Span::styled(std::mem::take(&mut run), *style));
                lines.push(Line::from(std::mem::take(&mut line)));
                columns = 0;
                if c == '\n' {
                    continue;
                }
            }
            if c.is_control() {
                continue;
            }
            run.push(c);
            columns += c_columns;
        }
        if !run.is_empty() {
            line.push(Span::styled(run, *style));
        }
    }
    if !line.is_empty() {
        lines.push(Line::from(line));
    }
    lines
}

fn width_of(text: &str) -> usize {
    text.chars().map(|c| c.width().unwrap_or(0)).sum()
}

/// `HH:MM` (UTC) of a time in ms since the Unix epoch.
fn clock(wall_ms: u64) -> String {
    let seconds_of_day = (wall_ms / 1000) % 86_400;
    format!("{:02}:{:02}", seconds_of_day / 3600, seconds_of_day % 3600 / 60)
}

/// One color per author (green for oneself), the same on every run.
fn author_color(author: &str, me: &str) -> Color {
    const COLORS: [Color; 5] = [Color::Cyan, Color::Magenta, Color::Blue, Color::Yellow, Color::LightRed];
    if author == me {
        return Color::Green;
    }
    let sum = author.bytes().fold(0usize, |sum, b| sum.wrapping_mul(31).wrapping_add(usize::from(b)));
    COLORS[sum % COLORS.len()]
}

#[cfg(test)]
mod tests {
    use palaver_proto::v1 as pb;
    use palaver_proto::v1::room_event::Event;
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    use super::*;

    fn screen_text(terminal: &Terminal<TestBackend>) -> String {
        let buffer = terminal.backend().buffer();
        let mut text = String::new();
        for y in 0..buffer.area.height {
            for x in 0..buffer.area.width {
                text.push_str(buffer[(x, y)].symbol());
            }
            text.push('\n');
        }
        text
    }

    fn posted(room: &str, id: &str, author: &str, body: &str, counter: u64) -> pb::RoomEvent {
        let at = pb::Position { wall_ms: 45_000_000 + counter * 60_000, logical: 0, replica: 1, counter };
        let message = pb::Message {
            message_id: id.into(),
            position: Some(at),
            author: author.into(),
            body: body.into(),
            edited: id == "b",
            reactions: if id == "b" {
                vec![pb::Reaction { reaction: "+1".into(), users: vec!["ann".into()] }]
            } else {
                vec![]
            },
            ..Default::default()
        };
        let event = pb::MessageEvent {
            position: Some(at),
            kind: pb::MessageEventKind::Posted as i32,
            message_id: id.into(),
            actor: author.into(),
            message: Some(message),
        };
        pb::RoomEvent { room: room.into(), event: Some(Event::Message(event)) }
    }

    #[test]
    fn the_chat_screen_shows_rooms_unread_counts_messages_and_the_input() {
        let mut state = ChatState::new("ann");
        let listed = |room: &str, member: bool, unread: u64| pb::RoomSummary {
            room: room.into(),
            my_role: if member { pb::Role::Member as i32 } else { 0 },
            unread_count: unread,
            ..Default::default()
        };
        state.set_rooms(&[listed("general", true, 0), listed("random", true, 3), listed("lobby", false, 0)]);
        state.select("general");
        state.apply(&posted("general", "a", "bob", "hello ann", 1));
        state.apply(&posted("general", "b", "ann", "hi bob", 2));
        state.apply(&pb::RoomEvent { room: "general".into(), event: Some(Event::CaughtUp(Default::default())) });
        let mut input = Input::default();
        for c in "typing here".chars() {
            input.insert(c);
        }
        let status = Status::Error("room_not_found: no such room".into());
        let mut terminal = Terminal::new(TestBackend::new(80, 12)).expect("test terminal");
        let screen =
            ChatScreen { state: &state, input: &input, status: &status, scroll_lines: 0, help: false, title: "ann" };
        terminal.draw(|frame| draw_chat(frame, &screen)).expect("draw");
        let text = screen_text(&terminal);
        for want in [
            "> general",
            "random (3)",
            "not joined:",
            "lobby",
            "[1] 12:31 bob: hello ann",
            "[2] 12:32 ann: hi bob (edited)",
            "+1 ann",
            "room_not_found: no such room",
            "> typing here",
        ] {
            assert!(text.contains(want), "{want:?} missing from\n{text}");
        }
        let help = ChatScreen { help: true, ..screen };
        terminal.draw(|frame| draw_chat(frame, &help)).expect("draw");
        assert!(screen_text(&terminal).contains("/react N EMOJI"));
    }

    #[test]
    fn the_login_form_masks_the_password() {
        let (mut user, mut password) = (Input::default(), Input::default());
        user.insert('a');
        for c in "secret".chars() {
            password.insert(c);
        }
        let status = Status::None;
        let screen = LoginScreen {
            addr: "127.0.0.1:7101",
            user: &user,
            password: &password,
            on_password: true,
            register: false,
            status: &status,
        };
        let mut terminal = Terminal::new(TestBackend::new(80, 12)).expect("test terminal");
        terminal.draw(|frame| draw_login(frame, &screen)).expect("draw");
        let text = screen_text(&terminal);
        assert!(text.contains("Password: ******"), "{text}");
        assert!(!text.contains("secret"));
    }

    #[test]
    fn long_lines_wrap_at_the_width() {
        let pieces = [("abc".to_owned(), Style::new()), ("defgh\nij".to_owned(), Style::new())];
        let lines: Vec<String> = wrap(&pieces, 4).iter().map(|l| l.to_string()).collect();
        assert_eq!(lines, vec!["abcd", "efgh", "ij"]);
        assert_eq!(clock(86_400_000 + 3_723_000), "01:02");
    }
}
