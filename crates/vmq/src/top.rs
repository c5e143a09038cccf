//! `vmq top`: live per-port rates (pps, Gbit/s), drops (in all and by reason) and VM queue
//! assignment, refreshed every interval like `top`, rows sorted by `--sort`. Interactive on a
//! terminal (alternate screen, `q`/Esc/Ctrl-C quits, the terminal is restored on every way out);
//! when stdout is not a terminal (a pipe, a file, a log), or with `--once` / `--iterations N`,
//! plain text frames one after another, separated by a blank line, without any escape sequence.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use crossterm::{cursor, execute, queue, terminal};
use vmq_control::protocol::{QueueReport, Request, Response, StatsReport};
use vmq_control::render::TopSort;
use vmq_control::server::DEFAULT_SOCKET;
use vmq_control::{Client, ClientError, render};

use crate::exit;

#[derive(Debug, Args)]
pub struct TopArgs {
    /// The control socket of the running vmq (`[control] socket`).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Time between two samples.
    #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    interval_ms: u64,
    /// Print one frame as plain text and exit.
    #[arg(long, conflicts_with = "iterations")]
    once: bool,
    /// Print N frames as plain text and exit.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    iterations: Option<u64>,
    /// Row order: busiest receivers (rx) or senders (tx) first, most drops first, or by name.
    #[arg(long, value_enum, default_value_t = SortArg::Rx)]
    sort: SortArg,
    /// How long to wait for vmq to answer a sample.
    #[arg(long, value_name = "MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SortArg {
    Rx,
    Tx,
    Drops,
    Name,
}

impl From<SortArg> for TopSort {
    fn from(s: SortArg) -> TopSort {
        match s {
            SortArg::Rx => TopSort::Rx,
            SortArg::Tx => TopSort::Tx,
            SortArg::Drops => TopSort::Drops,
            SortArg::Name => TopSort::Name,
        }
    }
}

/// One sample: counters, and queue assignment when vmq reports it.
struct Sample {
    stats: StatsReport,
    queues: Option<QueueReport>,
}

fn sample(socket: &Path, timeout: Duration) -> Result<Sample, ClientError> {
    let mut client = Client::connect(socket, timeout)?;
    let stats = match client.call(&Request::Stats { port: None })? {
        Response::Stats(s) => s,
        other => return Err(ClientError::Protocol(format!("stats answered with {other:?}"))),
    };
    // Queue assignment is an extra: a switch that cannot report it still gets a rate view.
    let queues = match client.call(&Request::Queues) {
        Ok(Response::Queues(q)) => Some(q),
        Ok(_) | Err(ClientError::Remote(_)) => None,
        Err(e) => return Err(e),
    };
    Ok(Sample { stats, queues })
}

pub fn top(args: TopArgs) -> ExitCode {
    let interval = Duration::from_millis(args.interval_ms);
    let timeout = Duration::from_millis(args.timeout_ms);
    let frames = if args.once { Some(1) } else { args.iterations };
    let interactive = frames.is_none() && std::io::stdout().is_terminal();
    let result = if interactive {
        interactive_loop(&args.socket, interval, timeout, args.sort.into())
    } else {
        plain_loop(&args.socket, interval, timeout, frames, args.sort.into())
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(TopError::Client(e)) => {
            eprintln!("vmq top: {e}");
            ExitCode::from(exit::for_client_error(&e))
        }
        Err(TopError::Terminal(e)) => {
            eprintln!("vmq top: terminal: {e}");
            ExitCode::from(exit::RUNTIME)
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum TopError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0}")]
    Terminal(#[from] std::io::Error),
}

/// Frames as plain text, one after another, each rated over the interval before it.
fn plain_loop(
    socket: &Path,
    interval: Duration,
    timeout: Duration,
    frames: Option<u64>,
    sort: TopSort,
) -> Result<(), TopError> {
    let mut previous = sample(socket, timeout)?;
    let mut printed = 0u64;
    while frames.is_none_or(|n| printed < n) {
        // The refresh period of the view, not a synchronisation.
        std::thread::sleep(interval);
        let current = sample(socket, timeout)?;
        let frame = render::top_frame(&previous.stats, &current.stats, current.queues.as_ref(), sort);
        let separator: &[u8] = if printed > 0 { b"\n" } else { b"" };
        let mut out = std::io::stdout().lock();
        match out.write_all(separator).and_then(|()| out.write_all(frame.as_bytes())).and_then(|()| out.flush()) {
            Ok(()) => {}
            // The reader went away (`vmq top | head`): done, not a failure.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        printed += 1;
        previous = current;
    }
    Ok(())
}

/// Raw mode and the alternate screen for as long as it lives; restores the terminal on drop,
/// so that every way out (quit, error, panic unwinding) leaves the shell usable.
struct TerminalGuard;

impl TerminalGuard {
    fn enter() -> std::io::Result<TerminalGuard> {
        terminal::enable_raw_mode()?;
        let guard = TerminalGuard;
        execute!(std::io::stdout(), terminal::EnterAlternateScreen, cursor::Hide)?;
        Ok(guard)
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        let _ = execute!(std::io::stdout(), cursor::Show, terminal::LeaveAlternateScreen);
        let _ = terminal::disable_raw_mode();
    }
}

fn draw(text: &str) -> std::io::Result<()> {
    // A terminal that does not know its size (0x0, as some ptys report) gets everything.
    let (width, height) = match terminal::size() {
        Ok((w, h)) if w > 0 && h > 0 => (usize::from(w), usize::from(h)),
        _ => (usize::MAX, usize::MAX),
    };
    let mut out = std::io::stdout().lock();
    queue!(out, cursor::MoveTo(0, 0), terminal::Clear(terminal::ClearType::All))?;
    // Raw mode: lines end in CR LF; long lines are cut rather than wrapped over the next row.
    for line in text.lines().take(height) {
        let cut: String = line.chars().take(width).collect();
        out.write_all(cut.as_bytes())?;
        out.write_all(b"\r\n")?;
    }
    out.flush()
}

/// Waits up to `period` for a key; true when the user asked to quit.
fn wait_for_quit(period: Duration) -> std::io::Result<bool> {
    let deadline = Instant::now() + period;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || !event::poll(left)? {
            return Ok(false);
        }
        if let Event::Key(key) = event::read()?
            && key.kind == KeyEventKind::Press
        {
            let ctrl_c = key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL);
            if ctrl_c || matches!(key.code, KeyCode::Char('q') | KeyCode::Char('Q') | KeyCode::Esc) {
                return Ok(true);
            }
        }
    }
}

fn interactive_loop(socket: &Path, interval: Duration, timeout: Duration, sort: TopSort) -> Result<(), TopError> {
    // Fail before touching the terminal if vmq is not there at all.
    let mut previous = sample(socket, timeout)?;
    let _guard = TerminalGuard::enter()?;
    draw(&format!("vmq top: sampling {} (q to quit)", socket.display()))?;
    loop {
        if wait_for_quit(interval)? {
            return Ok(());
        }
        match sample(socket, timeout) {
            Ok(current) => {
                let frame = render::top_frame(&previous.stats, &current.stats, current.queues.as_ref(), sort);
                draw(&format!("{frame}\nq: quit"))?;
                previous = current;
            }
            // vmq went away or stalled: say so and keep trying, as top does.
            Err(e) => draw(&format!("vmq top: {e}\nretrying every {} ms; q: quit", interval.as_millis()))?,
        }
    }
}
