//! The full-screen client: the terminal, the keys, and the loop that ties the state, the
//! server and the screen together.
//!
//! - The terminal is in raw mode on the alternate screen only while a [`TerminalGuard`] lives;
//!   dropping it (on `/quit`, Ctrl-C, an error, or a panic's unwinding) restores it.
//! - Keys are read on their own thread (crossterm's reads block) and sent over a bounded
//!   channel; the thread stops when the guard's owner drops the [`KeyReader`].
//! - Calls to the server run one after another on a worker task, so the screen never waits
//!   for the network and posts keep their order; each answer comes back as a [`Done`].
//! - Each joined room has a subscription task ([`super::session`]); its events are applied to
//!   the [`ChatState`] and the screen is drawn again.

use std::io::Stdout;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use palaver_proto::v1 as pb;
use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::event::{self, Event as TermEvent, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::crossterm::{cursor, execute, terminal};
use tokio::sync::mpsc;

use super::command::{self, Command};
use super::input::Input;
use super::render::{self, ChatScreen, LoginScreen, Status};
use super::session::{self, INCOMING_QUEUE_EVENTS, Incoming, Session, Subscriptions};
use super::state::{ChatState, Position};

/// Calls queued for the worker; more are refused with a notice.
pub const JOBS_QUEUED_MAX: usize = 64;
/// Terminal events queued from the key thread.
pub const KEYS_QUEUED_MAX: usize = 256;
/// How often the key thread checks whether it should stop.
pub const KEY_POLL_MS: u64 = 50;
/// Most subscription events applied between two draws.
pub const EVENTS_PER_DRAW_MAX: usize = 512;
/// Messages asked for by one `/history`.
pub const HISTORY_PAGE_MESSAGES: u32 = 50;
/// Lines scrolled by PageUp and PageDown.
pub const SCROLL_PAGE_LINES: usize = 10;

type Screen = Terminal<CrosstermBackend<Stdout>>;

/// Run the full-screen client.
pub async fn run(
    addr: &str,
    user: Option<String>,
    password: Option<String>,
    register: bool,
    room: Option<String>,
) -> anyhow::Result<()> {
    let client = session::connect(addr)?;
    let (_guard, mut screen) = TerminalGuard::enter().context("set the terminal up")?;
    let (key_sender, mut keys) = mpsc::channel(KEYS_QUEUED_MAX);
    let _key_reader = KeyReader::spawn(key_sender);
    let mut form = LoginForm {
        user: Input::default(),
        password: Input::default(),
        on_password: false,
        register,
        status: Status::None,
    };
    for c in user.unwrap_or_default().chars() {
        form.user.insert(c);
    }
    for c in password.unwrap_or_default().chars() {
        form.password.insert(c);
    }
    form.on_password = !form.user.is_empty();
    let ready = !form.user.is_empty() && !form.password.is_empty();
    let Some(session) = form.run(&mut screen, &mut keys, client, addr, ready).await? else {
        return Ok(());
    };
    let title = format!("{}@{addr}", session.user);
    let mut app = App::new(&session, &title);
    let result = app.run(&mut screen, &mut keys, room).await;
    app.subscriptions.shutdown().await;
    result
}

/// Raw mode and the alternate screen, restored on drop (and before a panic message prints).
struct TerminalGuard;

impl TerminalGuard {
    fn enter() -> anyhow::Result<(Self, Screen)> {
        terminal::enable_raw_mode()?;
        let guard = TerminalGuard;
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            previous(info);
        }));
        execute!(std::io::stdout(), terminal::EnterAlternateScreen)?;
        let screen = Terminal::new(CrosstermBackend::new(std::io::stdout()))?;
        Ok((guard, screen))
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore_terminal();
    }
}

fn restore_terminal() {
    let _ = terminal::disable_raw_mode();
    let _ = execute!(std::io::stdout(), terminal::LeaveAlternateScreen, cursor::Show);
}

/// The thread that reads terminal events; stopped and joined on drop.
struct KeyReader {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl KeyReader {
    fn spawn(sender: mpsc::Sender<TermEvent>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match event::poll(Duration::from_millis(KEY_POLL_MS)) {
                    Ok(false) => {}
                    Ok(true) => {
                        let Ok(event) = event::read() else { return };
                        if sender.blocking_send(event).is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        });
        Self { stop, thread: Some(thread) }
    }
}

impl Drop for KeyReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A key press (releases and repeats of terminals that report them are ignored).
fn pressed(event: TermEvent) -> Option<KeyEvent> {
    match event {
        TermEvent::Key(key) if key.kind == KeyEventKind::Press => Some(key),
        _ => None,
    }
}

fn is_ctrl(key: &KeyEvent, c: char) -> bool {
    key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char(c)
}

/// Edit `input` with `key`; false if the key is not an editing key.
fn edit(input: &mut Input, key: &KeyEvent) -> bool {
    match key.code {
        KeyCode::Char(c) if !key.modifiers.contains(KeyModifiers::CONTROL) => input.insert(c),
        KeyCode::Backspace => input.backspace(),
        KeyCode::Delete => input.delete(),
        KeyCode::Left => input.left(),
        KeyCode::Right => input.right(),
        KeyCode::Home => input.home(),
        KeyCode::End => input.end(),
        _ => return false,
    }
    true
}

/// The login form.
struct LoginForm {
    user: Input,
    password: Input,
    on_password: bool,
    register: bool,
    status: Status,
}

impl LoginForm {
    /// Ask for a user and password until a login succeeds (`None`: the user quit). With
    /// `ready`, try the given ones first.
    async fn run(
        &mut self,
        screen: &mut Screen,
        keys: &mut mpsc::Receiver<TermEvent>,
        client: palaver_proto::v1::chat_service_client::ChatServiceClient<tonic::transport::Channel>,
        addr: &str,
        mut ready: bool,
    ) -> anyhow::Result<Option<Session>> {
        loop {
            if ready {
                ready = false;
                self.status = Status::Info(format!("logging in as {}…", self.user.text()));
                self.draw(screen, addr)?;
                match Session::login(client.clone(), self.user.text(), self.password.text(), self.register).await {
                    Ok(session) => return Ok(Some(session)),
                    Err(error) => self.status = Status::Error(error),
                }
            }
            self.draw(screen, addr)?;
            let Some(event) = keys.recv().await else { return Ok(None) };
            let Some(key) = pressed(event) else { continue };
            if is_ctrl(&key, 'c') || key.code == KeyCode::Esc {
                return Ok(None);
            }
            if is_ctrl(&key, 'r') {
                self.register = !self.register;
                continue;
            }
            match key.code {
                KeyCode::Tab | KeyCode::BackTab | KeyCode::Up | KeyCode::Down => self.on_password = !self.on_password,
                KeyCode::Enter if self.user.is_empty() => self.on_password = false,
                KeyCode::Enter if self.password.is_empty() => self.on_password = true,
                KeyCode::Enter => ready = true,
                _ => {
                    let field = if self.on_password { &mut self.password } else { &mut self.user };
                    edit(field, &key);
                }
            }
        }
    }

    fn draw(&self, screen: &mut Screen, addr: &str) -> anyhow::Result<()> {
        let login = LoginScreen {
            addr,
            user: &self.user,
            password: &self.password,
            on_password: self.on_password,
            register: self.register,
            status: &self.status,
        };
        screen.draw(|frame| render::draw_login(frame, &login))?;
        Ok(())
    }
}

/// A call for the worker.
#[derive(Debug)]
enum Job {
    ListRooms,
    Join(String),
    Create(String),
    Leave(String),
    Post { room: String, body: String, seen: Option<Position> },
    Edit { room: String, message_id: String, body: String },
    React { room: String, message_id: String, reaction: String, remove: bool },
    Redact { room: String, message_id: String },
    History { room: String, before: Option<Position> },
    MarkRead { room: String, position: Position },
}

/// A call's answer.
#[derive(Debug)]
enum Done {
    Rooms(Vec<pb::RoomSummary>),
    Joined(String),
    Left(String),
    History {
        room: String,
        page: pb::HistoryResponse,
    },
    /// A read marker was sent (with the error, if it failed).
    Marked(Option<String>),
    Quiet,
    Failed(String),
}

/// Run `jobs` one after another, answering on `done`.
async fn worker(session: Session, mut jobs: mpsc::Receiver<Job>, done: mpsc::Sender<Done>) {
    while let Some(job) = jobs.recv().await {
        let answer = execute(&session, job).await;
        if done.send(answer).await.is_err() {
            return;
        }
    }
}

async fn execute(session: &Session, job: Job) -> Done {
    let failed =
        |what: String| move |status: tonic::Status| Done::Failed(format!("{what}: {}", session::describe(&status)));
    let result = match job {
        Job::ListRooms => session.list_rooms().await.map(Done::Rooms).map_err(failed("list rooms".into())),
        Job::Join(room) => {
            session.join(&room).await.map(|()| Done::Joined(room.clone())).map_err(failed(format!("join {room}")))
        }
        Job::Create(room) => {
            session.create(&room).await.map(|()| Done::Joined(room.clone())).map_err(failed(format!("create {room}")))
        }
        Job::Leave(room) => {
            session.leave(&room).await.map(|()| Done::Left(room.clone())).map_err(failed(format!("leave {room}")))
        }
        Job::Post { room, body, seen } => {
            session.post(&room, &body, seen).await.map(|_| Done::Quiet).map_err(failed("post".into()))
        }
        Job::Edit { room, message_id, body } => {
            session.edit(&room, &message_id, &body).await.map(|()| Done::Quiet).map_err(failed("edit".into()))
        }
        Job::React { room, message_id, reaction, remove } => session
            .react(&room, &message_id, &reaction, remove)
            .await
            .map(|()| Done::Quiet)
            .map_err(failed("react".into())),
        Job::Redact { room, message_id } => {
            session.redact(&room, &message_id).await.map(|()| Done::Quiet).map_err(failed("redact".into()))
        }
        Job::History { room, before } => session
            .history(&room, before, HISTORY_PAGE_MESSAGES)
            .await
            .map(|page| Done::History { room: room.clone(), page })
            .map_err(failed(format!("history of {room}"))),
        Job::MarkRead { room, position } => match session.mark_read(&room, position).await {
            Ok(()) => Ok(Done::Marked(None)),
            Err(status) => Ok(Done::Marked(Some(format!("mark {room} read: {}", session::describe(&status))))),
        },
    };
    result.unwrap_or_else(|done| done)
}

/// The chat screen's state and what it drives.
struct App {
    session: Session,
    title: String,
    state: ChatState,
    input: Input,
    status: Status,
    scroll_lines: usize,
    help: bool,
    quit: bool,
    subscriptions: Subscriptions,
    jobs: Option<mpsc::Sender<Job>>,
    /// A read marker to send once the one in flight is answered.
    mark_pending: Option<(String, Position)>,
    /// Whether a read marker is being sent (one at a time, the newest wins).
    mark_in_flight: bool,
}

impl App {
    fn new(session: &Session, title: &str) -> Self {
        Self {
            session: session.clone(),
            title: title.to_owned(),
            state: ChatState::new(&session.user),
            input: Input::default(),
            status: Status::Info("logged in; /help lists the commands".into()),
            scroll_lines: 0,
            help: false,
            quit: false,
            subscriptions: Subscriptions::default(),
            jobs: None,
            mark_pending: None,
            mark_in_flight: false,
        }
    }

    async fn run(
        &mut self,
        screen: &mut Screen,
        keys: &mut mpsc::Receiver<TermEvent>,
        room: Option<String>,
    ) -> anyhow::Result<()> {
        let (job_sender, job_receiver) = mpsc::channel(JOBS_QUEUED_MAX);
        let (done_sender, mut done) = mpsc::channel(JOBS_QUEUED_MAX);
        let worker = tokio::spawn(worker(self.session.clone(), job_receiver, done_sender));
        self.jobs = Some(job_sender);
        let (incoming_sender, mut incoming) = mpsc::channel(INCOMING_QUEUE_EVENTS);
        self.submit(Job::ListRooms);
        if let Some(room) = room {
            self.submit(Job::Join(room));
        }
        let result = loop {
            if let Err(e) = self.draw(screen) {
                break Err(e);
            }
            if self.quit {
                break Ok(());
            }
            tokio::select! {
                event = keys.recv() => match event {
                    Some(event) => self.on_terminal(event),
                    None => break Ok(()),
                },
                Some(first) = incoming.recv() => {
                    self.on_incoming(first);
                    for _ in 1..EVENTS_PER_DRAW_MAX {
                        let Ok(next) = incoming.try_recv() else { break };
                        self.on_incoming(next);
                    }
                }
                Some(answer) = done.recv() => self.on_done(answer, &incoming_sender),
            }
            self.send_read_mark();
        };
        self.jobs = None;
        worker.abort();
        let _ = worker.await;
        result
    }

    fn draw(&self, screen: &mut Screen) -> anyhow::Result<()> {
        let chat = ChatScreen {
            state: &self.state,
            input: &self.input,
            status: &self.status,
            scroll_lines: self.scroll_lines,
            help: self.help,
            title: &self.title,
        };
        screen.draw(|frame| render::draw_chat(frame, &chat))?;
        Ok(())
    }

    /// Send the read marker of the room shown if it moved, one call at a time.
    fn send_read_mark(&mut self) {
        if let Some(mark) = self.state.take_read_mark() {
            self.mark_pending = Some(mark);
        }
        if self.mark_in_flight {
            return;
        }
        if let Some((room, position)) = self.mark_pending.take() {
            self.mark_in_flight = true;
            self.submit(Job::MarkRead { room, position });
        }
    }

    fn submit(&mut self, job: Job) {
        let Some(jobs) = &self.jobs else { return };
        if let Err(refused) = jobs.try_send(job) {
            if matches!(refused.into_inner(), Job::MarkRead { .. }) {
                self.mark_in_flight = false;
            }
            self.status = Status::Error("too many calls in flight; try again".into());
        }
    }

    fn on_terminal(&mut self, event: TermEvent) {
        let Some(key) = pressed(event) else { return };
        if is_ctrl(&key, 'c') || (is_ctrl(&key, 'd') && self.input.is_empty()) {
            self.quit = true;
            return;
        }
        match key.code {
            KeyCode::Enter => {
                self.help = false;
                let line = self.input.take();
                match command::parse(&line) {
                    Ok(Some(command)) => {
                        self.status = Status::None;
                        self.command(command);
                    }
                    Ok(None) => {}
                    Err(error) => self.status = Status::Error(error),
                }
            }
            KeyCode::Esc => self.help = false,
            KeyCode::Tab | KeyCode::Down => self.switch(1),
            KeyCode::BackTab | KeyCode::Up => self.switch(-1),
            KeyCode::PageUp => self.scroll_lines = self.scroll_lines.saturating_add(SCROLL_PAGE_LINES),
            KeyCode::PageDown => self.scroll_lines = self.scroll_lines.saturating_sub(SCROLL_PAGE_LINES),
            _ => {
                edit(&mut self.input, &key);
            }
        }
    }

    fn switch(&mut self, step: isize) {
        self.state.select_next(step);
        self.scroll_lines = 0;
    }

    /// The current room, or a notice that there is none.
    fn current_room(&mut self) -> Option<String> {
        let room = self.state.current_name().map(str::to_owned);
        if room.is_none() {
            self.status = Status::Error("no room: /join ROOM or /create ROOM first".into());
        }
        room
    }

    /// The id of the message with `handle` in the current room, or a notice.
    fn message(&mut self, handle: u64) -> Option<(String, String)> {
        let room = self.current_room()?;
        let id = self.state.room(&room).and_then(|r| r.by_handle(handle)).map(|m| m.id.clone());
        if id.is_none() {
            self.status = Status::Error(format!("no message [{handle}] in {room}"));
        }
        Some((room, id?))
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Post(body) => {
                if let Some(room) = self.current_room() {
                    let seen = self.state.room(&room).and_then(|r| r.newest());
                    self.scroll_lines = 0;
                    self.submit(Job::Post { room, body, seen });
                }
            }
            Command::Join(room) => self.submit(Job::Join(room)),
            Command::Create(room) => self.submit(Job::Create(room)),
            Command::Leave => {
                if let Some(room) = self.current_room() {
                    self.submit(Job::Leave(room));
                }
            }
            Command::Room(room) => {
                if self.state.select(&room) {
                    self.scroll_lines = 0;
                } else {
                    self.status = Status::Error(format!("not a member of {room}: /join {room}"));
                }
            }
            Command::History => {
                let Some(room) = self.current_room() else { return };
                match self.state.room(&room) {
                    Some(view) if view.older_pages => {
                        let before = view.oldest();
                        self.submit(Job::History { room, before });
                    }
                    _ => self.status = Status::Info(format!("no older messages in {room}")),
                }
            }
            Command::React { handle, reaction, remove } => {
                if let Some((room, message_id)) = self.message(handle) {
                    self.submit(Job::React { room, message_id, reaction, remove });
                }
            }
            Command::Edit { handle, body } => {
                if let Some((room, message_id)) = self.message(handle) {
                    self.submit(Job::Edit { room, message_id, body });
                }
            }
            Command::Redact { handle } => {
                if let Some((room, message_id)) = self.message(handle) {
                    self.submit(Job::Redact { room, message_id });
                }
            }
            Command::Help => self.help = true,
            Command::Quit => self.quit = true,
        }
    }

    fn on_incoming(&mut self, incoming: Incoming) {
        match incoming {
            Incoming::Event(event) => {
                self.state.apply(&event);
                let resubscribing = format!("{}: resubscribing", event.room);
                let caught_up = matches!(event.event, Some(pb::room_event::Event::CaughtUp(_)));
                if caught_up && matches!(&self.status, Status::Error(text) if text.starts_with(&resubscribing)) {
                    self.status = Status::Info(format!("{}: resubscribed", event.room));
                }
            }
            Incoming::Link { room, link, error } => {
                self.state.set_link(&room, Some(link));
                if let Some(error) = error {
                    self.status = Status::Error(format!("{room}: resubscribing after {error}"));
                }
            }
            Incoming::Ended { room, reason } => {
                self.subscriptions.stop(&room);
                self.state.set_link(&room, None);
                if reason.starts_with("not_member") || reason.starts_with("room_not_found") {
                    self.state.left(&room);
                }
                self.status = Status::Error(format!("{room}: {reason}"));
            }
        }
    }

    fn on_done(&mut self, done: Done, incoming: &mpsc::Sender<Incoming>) {
        match done {
            Done::Rooms(rooms) => {
                self.state.set_rooms(&rooms);
                for room in self.state.joined_rooms().into_iter().map(str::to_owned).collect::<Vec<_>>() {
                    if self.state.room(&room).is_some_and(|r| r.link.is_none()) {
                        self.subscribe(&room, incoming);
                    }
                }
                if self.state.current_name().is_none() {
                    self.state.select_next(0);
                }
            }
            Done::Joined(room) => {
                self.state.joined(&room);
                self.subscribe(&room, incoming);
                self.scroll_lines = 0;
                self.status = Status::Info(format!("joined {room}"));
                self.submit(Job::ListRooms);
            }
            Done::Left(room) => {
                self.subscriptions.stop(&room);
                self.state.left(&room);
                self.status = Status::Info(format!("left {room}"));
                self.submit(Job::ListRooms);
            }
            Done::History { room, page } => {
                let added = self.state.add_history(&room, &page.messages, page.more);
                self.status = Status::Info(format!("{added} older messages loaded in {room} (PageUp scrolls back)"));
            }
            Done::Marked(error) => {
                self.mark_in_flight = false;
                if let Some(error) = error {
                    self.status = Status::Error(error);
                }
            }
            Done::Quiet => {}
            Done::Failed(error) => self.status = Status::Error(error),
        }
    }

    fn subscribe(&mut self, room: &str, incoming: &mpsc::Sender<Incoming>) {
        let have = self.state.room(room).map(|r| r.version_vector()).unwrap_or_default();
        self.state.set_link(room, Some(super::state::Link::CatchingUp));
        self.subscriptions.start(&self.session, room, have, incoming);
    }
}
