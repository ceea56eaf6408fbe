//! Payload copies: inputs into workers' arenas and outputs out of them (on
//! the copier thread when large, straight to and from payload files opened
//! through the payload directory's descriptor), and job replies that carry
//! a large output as a descriptor.

use super::*;

/// The store's payload file of job `id`'s output, if it is there with the
/// expected length.
fn open_output_file(
    payload_dir: &crate::private_dir::PrivateDir,
    id: u64,
    len: u64,
) -> Option<std::fs::File> {
    let file = payload_dir.open_read(&crate::store::output_name(id)).ok()?;
    file.metadata()
        .is_ok_and(|m| m.len() == len)
        .then_some(file)
}

/// Writes a large output straight from a worker's arena to its payload
/// file, synced with its directory, so that the store only records it (see
/// `JobUpdate::output_file_len`): one copy instead of arena → memory →
/// file. The file is created exclusively (from a spare file where there is
/// one, see [`crate::store::Spares`]), so a file a row may reference is
/// never touched; on any failure (it exists, the disk is full) whatever
/// this call created is removed and the caller takes the in-memory path,
/// where the store reports errors as usual.
fn output_to_file(
    mapping: &crate::shm::Mapping,
    spares: &crate::store::Spares,
    dir: &crate::private_dir::PrivateDir,
    name: &str,
    offset: u64,
    len: u64,
) -> bool {
    let Ok(file) = spares.create(name, len, true) else {
        return false;
    };
    let synced = mapping.write_to(&file, offset, len).is_ok_and(|ok| ok)
        && file.sync_data().is_ok()
        && dir.sync().is_ok();
    if !synced {
        let _ = dir.unlink(name);
    } else {
        spares.replenish(len);
    }
    synced
}

/// Copies a large output from a worker's arena into the client's output
/// buffer (`pwrite` at offset 0, growing it if needed: no mapping, so a
/// client that shrinks its buffer anyway cannot fault the daemon). `None`
/// if it cannot take it (sealed against growing, say): the caller makes
/// a memfd of its own.
fn output_to_buffer(
    mapping: &crate::shm::Mapping,
    buffer: Arc<std::fs::File>,
    offset: u64,
    len: u64,
) -> Option<crate::supervisor::OutputMemfd> {
    mapping
        .pwrite_to(&buffer, offset, len, 0)
        .ok()?
        .then_some(())?;
    Some(crate::supervisor::OutputMemfd { file: buffer, len })
}

/// Copies a large output from a worker's arena into a new memfd, sealed
/// against any change, for the clients waiting on the job (`payloads =
/// "memory"`). `None` on any failure: the caller takes the in-memory path.
fn output_to_memfd(
    mapping: &crate::shm::Mapping,
    offset: u64,
    len: u64,
) -> Option<crate::supervisor::OutputMemfd> {
    let file = jobvisor_client::fdpass::sealed_memfd_filled(c"jobvisor-output", |file| {
        file.set_len(len)?;
        // `write` from the arena at the file's offset 0.
        match mapping.write_to(file, offset, len)? {
            true => Ok(()),
            false => Err(std::io::Error::other("range outside the arena")),
        }
    })
    .ok()?;
    Some(crate::supervisor::OutputMemfd {
        file: Arc::new(file),
        len,
    })
}

impl Reactor {
    /// A worker's output of `len` bytes at `offset` of its arena (a
    /// `Done`'s, or with `raised` a `Raised`'s detail): copied out in place
    /// when small (and the slot released); else on the copier thread,
    /// straight into its payload file when it is one (this worker's later
    /// messages wait for the copy).
    pub(super) fn output_from_arena(
        &mut self,
        proc: ProcId,
        id: u64,
        mapping: Arc<crate::shm::Mapping>,
        (offset, len): (u64, u64),
        raised: Option<String>,
        now: Instant,
    ) {
        if len < crate::copier::OFFLOAD_MIN {
            let bytes = mapping.read_at(offset, len).expect("range checked");
            self.send(proc, &ToWorker::Release { offset, len });
            return self.job_output(proc, id, JobOutput::Mem(bytes), raised, now);
        }
        if let Some(w) = self.procs.get_mut(&proc) {
            w.copies_in += 1;
        }
        let large = len >= crate::store::FILE_PAYLOAD_MIN as u64;
        // `payloads = "memory"`: a large output goes to a sealed memfd for
        // the waiting clients, never to the store.
        let memfd = large && self.core.output_in_memory(id);
        // The client's own buffer when it gave one: its pages are reused.
        let buffer = self.core.output_buffer(id).filter(|_| memfd);
        // A store without payload files keeps the output in its row.
        let files = self.files.clone().filter(|_| large && !memfd);
        let name = files.as_ref().map(|_| crate::store::output_name(id));
        self.copier.run(move || {
            let in_memfd = buffer
                .and_then(|b| output_to_buffer(&mapping, b, offset, len))
                .or_else(|| {
                    memfd
                        .then(|| output_to_memfd(&mapping, offset, len))
                        .flatten()
                });
            let in_file = in_memfd.is_none()
                && name.as_ref().zip(files.as_ref()).is_some_and(|(n, f)| {
                    output_to_file(&mapping, &f.spares, &f.dir, n, offset, len)
                });
            let output = if let Some(m) = in_memfd {
                JobOutput::Memfd(m)
            } else if in_file {
                JobOutput::File(len)
            } else {
                JobOutput::Mem(mapping.read_at(offset, len).expect("range checked"))
            };
            Copied::FromArena {
                proc,
                id,
                offset,
                len,
                output,
                raised,
            }
        });
    }

    /// Copies `data` into `proc`'s arena at `offset` (an input slot the
    /// core allocated), before the `Job` frame the core queues next: in
    /// place when small, else on the copier thread, the frame held back
    /// until the copy is done.
    pub(super) fn write_arena(
        &mut self,
        proc: ProcId,
        offset: u64,
        data: impl AsRef<[u8]> + Send + 'static,
    ) {
        let Some(mapping) = self.arena_of(proc) else {
            return;
        };
        if (data.as_ref().len() as u64) < crate::copier::OFFLOAD_MIN {
            if !mapping.write_at(offset, data.as_ref()) {
                self.core.on_protocol_error(
                    proc,
                    "an input slot outside its shared-memory arena".into(),
                    Instant::now(),
                );
            }
            return;
        }
        self.hold_next_frame(proc);
        self.copier.run(move || Copied::ToArena {
            proc,
            ok: mapping.write_at(offset, data.as_ref()),
            unreadable: None,
        });
    }

    /// The worker's arena mapping; `None` (and the worker is dropped as
    /// broken: a Job frame would point at garbage) if it has none.
    pub(super) fn arena_of(&mut self, proc: ProcId) -> Option<Arc<crate::shm::Mapping>> {
        let w = self.procs.get(&proc)?;
        let mapping = w.mapping.clone();
        if mapping.is_none() {
            self.core.on_protocol_error(
                proc,
                "its shared-memory arena is not mapped".into(),
                Instant::now(),
            );
        }
        mapping
    }

    /// Holds back the next frame queued for `proc` (and all after it) until
    /// the copy started now is done (see `on_copied`).
    pub(super) fn hold_next_frame(&mut self, proc: ProcId) {
        if let Some(w) = self.procs.get_mut(&proc) {
            w.hold_out.push_back(w.jobs_out.len());
        }
    }

    /// [`Self::write_arena`] of a job's input kept in the store's payload
    /// file (always on the copier thread: at least a mebibyte).
    pub(super) fn write_arena_from_file(
        &mut self,
        proc: ProcId,
        offset: u64,
        job: u64,
        len: u64,
        source: Option<crate::store::InputSource>,
    ) {
        let Some(mapping) = self.arena_of(proc) else {
            return;
        };
        self.hold_next_frame(proc);
        let dir = self.files.as_ref().map(|f| Arc::clone(&f.dir));
        let path = dir
            .as_ref()
            .map(|d| crate::store::input_file(d.path(), job))
            .unwrap_or_default();
        let name = crate::store::input_name(job);
        self.copier.run(move || {
            let read = match (&source, dir) {
                // Not durable yet: the client's own file.
                (Some(src), _) => mapping.fill_from(&src.file, offset, len),
                (None, None) => Err(std::io::Error::other("the store keeps no payload files")),
                (None, Some(dir)) => dir.open_read(&name).and_then(|f| {
                    use std::os::unix::fs::MetadataExt;
                    let meta = f.metadata()?;
                    if meta.len() != len {
                        return Err(std::io::Error::other(format!(
                            "it has {} bytes instead of {len}",
                            meta.len()
                        )));
                    }
                    let read = mapping.fill_from(&f, offset, len)?;
                    // The input file of a job that ended (cancelled while
                    // this copy ran) may have been recycled as another
                    // payload meanwhile: then what was read is not its
                    // input. (The job has ended: this only keeps a worker
                    // from running on the wrong bytes.)
                    if dir.stat(&name).ok().flatten().map(|st| st.st_ino) != Some(meta.ino()) {
                        return Err(std::io::Error::other("the job ended while it was read"));
                    }
                    Ok(read)
                }),
            };
            match read {
                Ok(ok) => Copied::ToArena {
                    proc,
                    ok,
                    unreadable: None,
                },
                Err(e) => Copied::ToArena {
                    proc,
                    ok: true,
                    unreadable: Some((
                        job,
                        match &source {
                            Some(_) => format!(
                                "its input cannot be read from the file it was submitted from ({e}); submit it again"
                            ),
                            None => format!(
                                "its input payload file {} cannot be read ({e}); submit it again",
                                path.display()
                            ),
                        },
                    )),
                },
            }
        });
    }

    /// Collects what the copier thread has finished.
    pub(super) fn on_copier(&mut self) {
        while let Some(c) = self.copier.try_done() {
            self.on_copied(c);
        }
    }

    pub(super) fn on_copied(&mut self, c: Copied) {
        let now = Instant::now();
        match c {
            Copied::ToArena {
                proc,
                ok,
                unreadable,
            } => {
                let Some(w) = self.procs.get_mut(&proc) else {
                    return;
                };
                let at = w.hold_out.pop_front();
                self.dirty_workers.insert(proc);
                if let (Some((job, error)), Some(at)) = (unreadable, at) {
                    // The held Job frame must not reach the worker: cut it
                    // out (its length prefix says where it ends).
                    let end = w.jobs_out.get(at..at + 4).map(|b| {
                        at + 4 + u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize
                    });
                    if let Some(end) = end.filter(|e| *e <= w.jobs_out.len()) {
                        w.jobs_out.drain(at..end);
                        let cut = end - at;
                        w.hold_out.iter_mut().for_each(|h| *h -= cut);
                        // Its descriptors (an output buffer) go with it.
                        w.fds_out.retain(|(f, _)| *f != at);
                        w.fds_out
                            .iter_mut()
                            .filter(|(f, _)| *f > at)
                            .for_each(|(f, _)| *f -= cut);
                    }
                    self.core.on_input_unreadable(proc, job, error, now);
                    return self.run_actions();
                }
                if !ok {
                    self.core.on_protocol_error(
                        proc,
                        "an input slot outside its shared-memory arena".into(),
                        now,
                    );
                }
            }
            Copied::FromArena {
                proc,
                id,
                offset,
                len,
                output,
                raised,
            } => {
                let Some(w) = self.procs.get_mut(&proc) else {
                    return;
                };
                w.copies_in -= 1;
                self.send(proc, &ToWorker::Release { offset, len });
                self.job_output(proc, id, output, raised, now);
                // What came after it, until the next pending copy.
                while let Some(w) = self.procs.get_mut(&proc) {
                    if w.copies_in > 0 {
                        break;
                    }
                    if let Some(m) = w.held_in.pop_front() {
                        self.on_worker_msg(proc, m, now);
                    } else if let Some(end) = w.held_end.take() {
                        self.on_results_end(proc, end, now);
                    } else if let Some(exit) = w.exit.take() {
                        self.worker_gone_now(proc, exit);
                    } else {
                        break;
                    }
                }
            }
        }
        self.run_actions();
    }

    /// The arena mapping of `proc` if `offset`/`len` is a valid output
    /// range in it.
    pub(super) fn output_slot(
        &self,
        proc: ProcId,
        offset: u64,
        len: u64,
    ) -> Result<Arc<crate::shm::Mapping>, String> {
        let w = self.procs.get(&proc).ok_or("worker gone")?;
        ipc_proto::arena::check_ref(&w.layout.output, offset, len).map_err(|e| e.to_string())?;
        let m = w
            .mapping
            .clone()
            .ok_or_else(|| "its arena is not mapped".to_string())?;
        // check_ref bounds it by the layout, which lies inside the mapping.
        Ok(m)
    }

    /// A job document with a large output beside it. The output is in the
    /// store's payload file (replies wait for durability, and a stored one
    /// is only there), so the client gets a descriptor of that file; else
    /// (an in-memory output whose file is gone or was never written) a
    /// sealed memfd copy.
    pub(super) fn reply_job(&mut self, client: u64, mut doc: JobDoc, output: JobOutput) {
        let Some(c) = self.clients.get_mut(&client) else {
            return;
        };
        self.dirty_clients.insert(client);
        let len = match &output {
            JobOutput::Mem(o) => o.len() as u64,
            JobOutput::File(len) => *len,
            JobOutput::Memfd(m) => {
                // Each waiter gets its own descriptor of the one sealed memfd.
                match m.file.try_clone() {
                    Ok(f) => c.send_job_fd(&doc, m.len, f.into()),
                    Err(e) => {
                        doc.note_error(format!("cannot pass the output's memfd ({e})"));
                        c.send(&Response::Job(doc));
                    }
                }
                return;
            }
        };
        let file = self
            .files
            .as_ref()
            .and_then(|f| open_output_file(&f.dir, doc.id, len));
        if let Some(file) = file {
            return c.send_job_fd(&doc, len, file.into());
        }
        match output {
            JobOutput::Mem(o) => c.send_job_output(&doc, &o),
            JobOutput::Memfd(_) => unreachable!("answered above"),
            JobOutput::File(_) => {
                // Checked by the store a moment ago; removed since.
                let dir = self.files.as_ref().map(|f| f.dir.path().to_path_buf());
                doc.note_error(format!(
                    "output payload file {} is missing",
                    crate::store::output_file(&dir.unwrap_or_default(), doc.id).display()
                ));
                c.send(&Response::Job(doc));
            }
        }
    }
}
