//! Worker output kept for `jobvisorctl logs`: the last lines of every
//! worker slot, in a ring bounded by lines and bytes, kept across the
//! slot's restarts (what a worker printed before it crashed is the part
//! one wants to read), and the clients following new lines (`logs -f`).
//!
//! Every line a worker writes goes into its slot's ring, including the
//! lines that the journal's rate limit drops (the ring is bounded by
//! itself: a flood only turns it over faster). The daemon adds its own
//! notes on the slot (started, exited) as [`LogStream::Daemon`] lines.

use super::*;
use ipc_proto::control::{LogLine, LogStream};
use std::collections::{BTreeMap, VecDeque};

/// Lines kept per worker slot.
pub(super) const RING_LINES: usize = 1000;
/// Bytes of text kept per worker slot (lines are at most
/// [`MAX_LOG_LINE`]).
pub(super) const RING_BYTES: usize = 128 << 10;
/// Bytes of `logs -f` output a client may leave unread before it is
/// dropped (the worker's output does not wait for it).
pub(super) const FOLLOW_BACKLOG_LIMIT: usize = 8 << 20;

/// One kept line; its text is the next `len` bytes of [`Ring::text`].
struct Entry {
    time_ms: u64,
    stream: LogStream,
    len: u32,
}

/// A slot's lines: their texts back to back in one buffer, so that keeping
/// a line costs no allocation (a flooding worker writes millions).
#[derive(Default)]
struct Ring {
    lines: VecDeque<Entry>,
    text: VecDeque<u8>,
}

impl Ring {
    fn push(&mut self, time_ms: u64, stream: LogStream, line: &str) {
        self.text.extend(line.as_bytes());
        self.lines.push_back(Entry {
            time_ms,
            stream,
            len: line.len() as u32,
        });
        while self.lines.len() > RING_LINES || self.text.len() > RING_BYTES {
            match self.lines.pop_front() {
                Some(old) => drop(self.text.drain(..old.len as usize)),
                None => break,
            }
        }
    }

    /// Each line with its text.
    fn iter(&self) -> impl Iterator<Item = (&Entry, String)> + '_ {
        let mut at = 0;
        self.lines.iter().map(move |e| {
            let end = at + e.len as usize;
            let bytes: Vec<u8> = self.text.range(at..end).copied().collect();
            at = end;
            // Pushed as `&str`, so valid UTF-8.
            (e, String::from_utf8_lossy(&bytes).into_owned())
        })
    }
}

/// Where one read of a worker's pipe puts its lines (see
/// [`LogBook::writer`]).
pub(super) struct Writer<'a> {
    ring: &'a mut Ring,
    pool: &'a str,
    slot: u32,
    followers: &'a HashMap<u64, Follower>,
    outbox: &'a mut Vec<(u64, LogLine)>,
}

impl Writer<'_> {
    /// Keeps one line (and queues it for the clients following it).
    pub(super) fn push(&mut self, stream: LogStream, time_ms: u64, line: &str) {
        for (client, f) in self.followers {
            if f.pool == self.pool && f.worker.is_none_or(|w| w == self.slot) {
                self.outbox.push((
                    *client,
                    LogLine {
                        time_ms,
                        pool: self.pool.to_string(),
                        worker: self.slot,
                        stream,
                        line: line.to_string(),
                    },
                ));
            }
        }
        self.ring.push(time_ms, stream, line);
    }
}

/// Which lines a `logs -f` client gets.
struct Follower {
    pool: String,
    worker: Option<u32>,
}

/// The rings and the followers.
#[derive(Default)]
pub(super) struct LogBook {
    /// Pool → slot → ring.
    rings: HashMap<String, BTreeMap<u32, Ring>>,
    followers: HashMap<u64, Follower>,
    /// Lines for followers, sent by the reactor at the end of the read
    /// that produced them.
    outbox: Vec<(u64, LogLine)>,
}

impl LogBook {
    /// Where the lines of `pool`'s worker `slot` go (looked up once per
    /// read, not per line).
    pub(super) fn writer<'a>(&'a mut self, pool: &'a str, slot: u32) -> Writer<'a> {
        if !self.rings.contains_key(pool) {
            self.rings.insert(pool.to_string(), BTreeMap::new());
        }
        let slots = self.rings.get_mut(pool).expect("inserted above");
        Writer {
            ring: slots.entry(slot).or_default(),
            pool,
            slot,
            followers: &self.followers,
            outbox: &mut self.outbox,
        }
    }

    /// Keeps one line of `pool`'s worker `slot` (and queues it for the
    /// clients following it).
    pub(super) fn push(
        &mut self,
        pool: &str,
        slot: u32,
        stream: LogStream,
        time_ms: u64,
        line: &str,
    ) {
        self.writer(pool, slot).push(stream, time_ms, line);
    }

    /// Whether `pool` has kept lines of worker `slot` (a slot that a
    /// `scale` down removed still has them).
    pub(super) fn has(&self, pool: &str, slot: u32) -> bool {
        self.rings.get(pool).is_some_and(|s| s.contains_key(&slot))
    }

    /// The last `lines` kept lines of the pool (or one slot), logged at or
    /// after `since_ms`, oldest first (slots merged by time).
    pub(super) fn recent(
        &self,
        pool: &str,
        worker: Option<u32>,
        lines: usize,
        since_ms: Option<u64>,
    ) -> Vec<LogLine> {
        let Some(slots) = self.rings.get(pool) else {
            return Vec::new();
        };
        let mut picked: Vec<LogLine> = slots
            .iter()
            .filter(|(id, _)| worker.is_none_or(|w| w == **id))
            .flat_map(|(id, ring)| {
                ring.iter().map(move |(e, line)| LogLine {
                    time_ms: e.time_ms,
                    pool: pool.to_string(),
                    worker: *id,
                    stream: e.stream,
                    line,
                })
            })
            .filter(|l| since_ms.is_none_or(|s| l.time_ms >= s))
            .collect();
        // Stable: a slot's own lines keep their order at equal times.
        picked.sort_by_key(|l| l.time_ms);
        let skip = picked.len().saturating_sub(lines);
        picked.drain(..skip);
        picked
    }

    pub(super) fn follow(&mut self, client: u64, pool: String, worker: Option<u32>) {
        self.followers.insert(client, Follower { pool, worker });
    }

    pub(super) fn unfollow(&mut self, client: u64) {
        self.followers.remove(&client);
    }

    pub(super) fn followers(&self) -> impl Iterator<Item = u64> + '_ {
        self.followers.keys().copied()
    }

    pub(super) fn take_outbox(&mut self) -> Vec<(u64, LogLine)> {
        std::mem::take(&mut self.outbox)
    }

    /// Forgets the pools a reload removed.
    pub(super) fn retain_pools(&mut self, keep: impl Fn(&str) -> bool) {
        self.rings.retain(|name, _| keep(name));
    }
}

/// Wall-clock time in ms since the epoch.
pub(super) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Reactor {
    /// Sends followers the lines queued for them; drops a follower that
    /// has left too much unread.
    pub(super) fn deliver_log_lines(&mut self) {
        let out = self.logs.take_outbox();
        if out.is_empty() {
            return;
        }
        for (client, line) in out {
            let behind = match self.clients.get(&client) {
                Some(c) => c.pending_output() > FOLLOW_BACKLOG_LIMIT,
                None => continue,
            };
            if behind {
                crate::warn!("logs client {client} is too far behind; disconnecting it");
                self.drop_client(client);
                continue;
            }
            self.reply(client, &Response::LogLine(line));
        }
    }

    /// `Logs`: the kept lines, then `End` or, with `follow`, the new ones
    /// as they come.
    pub(super) fn logs_request(
        &mut self,
        client: u64,
        pool: String,
        worker: Option<u32>,
        lines: u32,
        since_ms: Option<u64>,
        follow: bool,
    ) {
        let slots = match self.core.pool_slots(&pool) {
            Ok(n) => n,
            Err(e) => return self.reply(client, &e.into_response()),
        };
        if let Some(w) = worker.filter(|&w| w >= slots && !self.logs.has(&pool, w)) {
            let which = match slots {
                0 => "no workers".to_string(),
                1 => "one worker, 0".to_string(),
                n => format!("workers 0 to {}", n - 1),
            };
            return self.reply(
                client,
                &Response::Error {
                    kind: ErrorKind::NotFound,
                    message: format!(
                        "pool {pool:?} has {which}, and no output kept of a worker {w}; see `jobvisorctl status {pool}`"
                    ),
                },
            );
        }
        let n = (lines as usize).min(RING_LINES * slots.max(1) as usize);
        for line in self.logs.recent(&pool, worker, n, since_ms) {
            self.reply(client, &Response::LogLine(line));
        }
        if follow {
            self.logs.follow(client, pool, worker);
        } else {
            self.reply(client, &Response::End);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rings_are_bounded_by_lines_and_bytes() {
        let mut b = LogBook::default();
        for i in 0..RING_LINES + 10 {
            b.push("p", 0, LogStream::Stdout, i as u64, &format!("{i}"));
        }
        let all = b.recent("p", None, usize::MAX, None);
        assert_eq!(all.len(), RING_LINES);
        assert_eq!(all[0].line, "10");
        let big = "x".repeat(4096);
        for i in 0..100 {
            b.push("p", 1, LogStream::Stderr, i, &big);
        }
        let one = b.recent("p", Some(1), usize::MAX, None);
        assert_eq!(one.len(), RING_BYTES / 4096);
        assert!(one
            .iter()
            .all(|l| l.worker == 1 && l.stream == LogStream::Stderr));
    }

    #[test]
    fn recent_merges_slots_by_time_and_filters() {
        let mut b = LogBook::default();
        b.push("p", 1, LogStream::Stdout, 5, "b");
        b.push("p", 0, LogStream::Stdout, 3, "a");
        b.push("p", 0, LogStream::Stdout, 9, "c");
        b.push("q", 0, LogStream::Stdout, 4, "other pool");
        let text = |v: Vec<LogLine>| v.into_iter().map(|l| l.line).collect::<Vec<_>>();
        assert_eq!(text(b.recent("p", None, 10, None)), ["a", "b", "c"]);
        assert_eq!(text(b.recent("p", None, 2, None)), ["b", "c"]);
        assert_eq!(text(b.recent("p", None, 10, Some(5))), ["b", "c"]);
        assert_eq!(text(b.recent("p", Some(0), 10, None)), ["a", "c"]);
        assert!(b.recent("nope", None, 10, None).is_empty());
        assert!(b.has("p", 1) && !b.has("p", 2));
    }

    #[test]
    fn followers_get_their_pools_lines() {
        let mut b = LogBook::default();
        b.follow(7, "p".into(), None);
        b.follow(8, "p".into(), Some(1));
        b.push("p", 0, LogStream::Stdout, 1, "zero");
        b.push("p", 1, LogStream::Stdout, 2, "one");
        b.push("q", 1, LogStream::Stdout, 3, "elsewhere");
        let mut out: Vec<(u64, String)> = b
            .take_outbox()
            .into_iter()
            .map(|(c, l)| (c, l.line))
            .collect();
        out.sort();
        assert_eq!(
            out,
            [(7, "one".into()), (7, "zero".into()), (8, "one".into())]
        );
        b.unfollow(7);
        b.push("p", 0, LogStream::Stdout, 4, "later");
        assert!(b.take_outbox().is_empty());
    }
}
