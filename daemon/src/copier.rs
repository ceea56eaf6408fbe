//! The copier thread: big copies (payloads into workers' arenas, from memory
//! or from a file; large outputs out of them, into memory or straight into
//! their payload files) run here, so that a 64 MiB copy never stalls the
//! event loop's dispatch of other jobs.
//!
//! The loop hands over a closure with [`Copier::run`] and gets its result
//! back, in submission order, from [`Copier::try_done`] after the thread
//! wakes it through its [`mio::Waker`]. The loop keeps the order of what
//! depends on a copy itself (it holds back a worker's later frames, or its
//! later messages, until the copy is done); the thread knows
//! nothing of jobs. Copies below [`OFFLOAD_MIN`] bytes are cheaper done in
//! place than handed over (two context switches), and are.

use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Copies of at least this many bytes go to the copier thread.
pub const OFFLOAD_MIN: u64 = 256 << 10;

type Task<T> = Box<dyn FnOnce() -> T + Send>;

/// A handle on the copier thread, yielding `T`s.
///
/// The thread only dies if a task panics (a bug). Then the handle panics
/// too, at the next hand-over: the tasks queued behind the one that
/// panicked are lost, and the loop would wait for them for ever (frames
/// held back, messages not handled). A daemon that exits is restarted by
/// its supervisor and recovers every job from the store.
pub struct Copier<T> {
    tasks: Option<Sender<Task<T>>>,
    done: Receiver<T>,
    thread: Option<JoinHandle<()>>,
}

const DIED: &str =
    "the copier thread died (a copy panicked); exiting so that jobvisord is restarted";

impl<T: Send + 'static> Copier<T> {
    /// Starts the thread; it wakes the loop with `waker` after each task.
    pub fn start(waker: Arc<mio::Waker>) -> std::io::Result<Copier<T>> {
        let (tasks, task_rx) = mpsc::channel::<Task<T>>();
        let (done_tx, done) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("jobvisor-copier".into())
            .spawn(move || {
                for task in task_rx {
                    if done_tx.send(task()).is_err() {
                        return;
                    }
                    let _ = waker.wake();
                }
            })?;
        Ok(Copier {
            tasks: Some(tasks),
            done,
            thread: Some(thread),
        })
    }

    /// Runs `task` on the copier thread.
    pub fn run(&mut self, task: impl FnOnce() -> T + Send + 'static) {
        let tasks = self.tasks.as_ref().expect("the copier is running");
        if tasks.send(Box::new(task)).is_err() {
            panic!("{DIED}");
        }
    }

    /// The next finished task, if any.
    pub fn try_done(&mut self) -> Option<T> {
        match self.done.try_recv() {
            Ok(t) => Some(t),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => panic!("{DIED}"),
        }
    }
}

impl<T> Drop for Copier<T> {
    fn drop(&mut self) {
        self.tasks = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn results_come_back_in_order_with_a_wakeup() {
        let mut poll = mio::Poll::new().unwrap();
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(9)).unwrap());
        let mut c = Copier::start(waker).unwrap();
        for i in 0..100u32 {
            c.run(move || {
                if i % 10 == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
                i
            });
        }
        let mut got = Vec::new();
        let mut events = mio::Events::with_capacity(8);
        while got.len() < 100 {
            poll.poll(&mut events, Some(Duration::from_secs(10)))
                .unwrap();
            assert!(!events.is_empty(), "no wakeup within 10 s");
            while let Some(v) = c.try_done() {
                got.push(v);
            }
        }
        assert_eq!(got, (0..100).collect::<Vec<_>>());
    }

    #[test]
    #[should_panic(expected = "the copier thread died")]
    fn a_task_that_panics_brings_the_handle_down_instead_of_a_silent_stall() {
        let poll = mio::Poll::new().unwrap();
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(9)).unwrap());
        let mut c = Copier::<u32>::start(waker).unwrap();
        c.run(|| panic!("a bug in a copy"));
        c.run(|| 2);
        // The second task never runs: once the thread is gone, collecting
        // panics (the thread wakes nobody when it dies, hence the polling).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            assert_eq!(c.try_done(), None);
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
