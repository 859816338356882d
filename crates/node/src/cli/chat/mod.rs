//! `palaver chat`: a terminal chat client for any node.
//!
//! Two modes over the same pieces:
//! - **Full screen** (the default): a login form when `--user` or the password is missing
//!   (password masked), a room list with unread counts, the current room's messages (author,
//!   time, edited and redacted marks, reactions), a status line and an input line taking posts
//!   and `/commands` (`/help` lists them). See [`tui`] and [`render`].
//! - **`--plain`**: line mode for scripts and pipes: standard input is posted to `--room`, the
//!   room's events are printed one per line in a stable format. See [`plain`].
//!
//! Both log in, subscribe to every joined room from a version vector kept per room, resubscribe
//! after a broken stream or a lost node with backoff, and show each event once ([`session`]).
//! What the client knows — rooms, messages, unread counts, what an event changes, what a typed
//! line means — is plain data with unit tests ([`state`], [`command`], [`input`]).
//!
//! `--addr` may name several nodes (comma-separated): calls and resubscriptions then go to
//! the ones that answer, so the client rides out the loss of its node.
//!
//! Not done here: no new login when a token expires, no typing notifications sent (others' are shown), no
//! presence.

mod command;
mod input;
mod plain;
mod render;
mod session;
mod state;
mod tui;

use clap::Args;

/// Arguments of `palaver chat`.
#[derive(Debug, Args)]
pub struct ChatArgs {
    /// Any node's gRPC address, or several, comma-separated (the client moves between them).
    #[arg(long, default_value = "127.0.0.1:7101")]
    addr: String,
    /// The user to log in as (full screen: asked for if missing).
    #[arg(long)]
    user: Option<String>,
    /// The password (else the PALAVER_PASSWORD environment variable; full screen: asked for).
    #[arg(long, env = "PALAVER_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// Register the user before logging in (a taken name is not an error).
    #[arg(long)]
    register: bool,
    /// The room to join and show first (required with --plain).
    #[arg(long)]
    room: Option<String>,
    /// Line mode: post standard input to --room, print its events one per line as
    /// `ROOM AUTHOR: BODY` (posts) or `ROOM * ...` (edits, redactions, reactions, membership).
    #[arg(long)]
    plain: bool,
}

/// Run `palaver chat`.
pub async fn run(args: ChatArgs) -> anyhow::Result<()> {
    if args.plain {
        let (Some(user), Some(password), Some(room)) = (&args.user, &args.password, &args.room) else {
            anyhow::bail!("--plain needs --user, --room and a password (--password or PALAVER_PASSWORD)");
        };
        return plain::run(&args.addr, user, password, args.register, room).await;
    }
    tui::run(&args.addr, args.user, args.password, args.register, args.room).await
}
