"use strict";
/**
 * Shared plumbing for the Node.js job-queue peer drivers (graphile.js,
 * pgboss.js): arguments, worker child processes (IPC, bounded stop), bounded
 * polling every 100 ms, paced latency enqueue, nearest-rank percentiles and
 * the one JSON line per variant. Logs go to stderr; stdout carries JSON only.
 */

const { fork } = require("node:child_process");
const path = require("node:path");
const { performance } = require("node:perf_hooks");
const { parseArgs } = require("node:util");

const POLL_MS = 100; // completion polling period from the parent
const STOP_GRACE_MS = 30_000; // how long a worker gets to exit after "stop"
const READY_TIMEOUT_MS = 120_000; // how long a worker gets to connect

class BenchError extends Error {} // a phase failed / exceeded its deadline: exit 2
class Interrupted extends Error {} // SIGINT/SIGTERM to the driver: exit 130

/** Wall-clock time in ms with sub-ms resolution, comparable across processes. */
function wallMs() {
  return performance.timeOrigin + performance.now();
}

function log(msg) {
  const t = new Date().toTimeString().slice(0, 8);
  process.stderr.write(`[${t}] ${msg}\n`);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function parseCli(system, script) {
  const { values } = parseArgs({
    options: {
      dsn: { type: "string" },
      jobs: { type: "string", default: "200000" },
      "latency-jobs": { type: "string", default: "1000" },
      procs: { type: "string", default: "2" },
      variant: { type: "string", default: "both" },
      rate: { type: "string", default: "100" },
      "phase-timeout": { type: "string", default: "1800" },
      help: { type: "boolean", short: "h", default: false },
    },
    strict: true,
  });
  const usage =
    `usage: node ${script} --dsn postgres://USER@HOST:PORT/DB [--jobs 200000] ` +
    `[--latency-jobs 1000] [--procs 2] [--variant default|tuned|both] [--rate 100] ` +
    `[--phase-timeout 1800]`;
  if (values.help) {
    process.stderr.write(usage + "\n");
    process.exit(0);
  }
  const a = {
    dsn: values.dsn,
    jobs: Number(values.jobs),
    latencyJobs: Number(values["latency-jobs"]),
    procs: Number(values.procs),
    variant: values.variant,
    rate: Number(values.rate),
    phaseTimeoutMs: Number(values["phase-timeout"]) * 1000,
  };
  const bad =
    !a.dsn ||
    !Number.isInteger(a.jobs) || a.jobs < 1 ||
    !Number.isInteger(a.latencyJobs) || a.latencyJobs < 0 ||
    !Number.isInteger(a.procs) || a.procs < 1 ||
    !(a.rate > 0) || !(a.phaseTimeoutMs > 0) ||
    !["default", "tuned", "both"].includes(a.variant);
  if (bad) {
    process.stderr.write(usage + "\n");
    process.exit(64);
  }
  return a;
}

function variants(arg) {
  return arg === "both" ? ["default", "tuned"] : [arg];
}

// ---------------------------------------------------------------------------
// worker child processes

/**
 * `procs` children, each `node <script> --worker-child` with the config in
 * an environment variable. Children write their logs to our stderr (their
 * stdout is redirected there too), report {type:"ready"} and latency samples
 * {type:"lat", ms} over IPC, stop gracefully on {type:"stop"}, and exit by
 * themselves if the IPC channel closes (driver gone).
 */
class Workers {
  constructor(script, procs, config) {
    this.children = [];
    this.samples = [];
    this.ready = 0;
    this.exitedEarly = null;
    this.stopping = false;
    for (let i = 0; i < procs; i++) {
      const child = fork(script, ["--worker-child"], {
        stdio: ["ignore", 2, 2, "ipc"],
        detached: true, // own process group: killed as a whole at cleanup
        env: { ...process.env, ...(config.env || {}), BENCH_WORKER_CONFIG: JSON.stringify({ ...config, index: i }) },
      });
      const rec = { child, pid: child.pid, exited: false, code: null, signal: null };
      child.on("message", (m) => {
        if (m && m.type === "ready") this.ready++;
        else if (m && m.type === "lat") this.samples.push(m.ms);
        else if (m && m.type === "lats") for (const v of m.ms) this.samples.push(v);
      });
      child.on("exit", (code, signal) => {
        rec.exited = true;
        rec.code = code;
        rec.signal = signal;
        if (!this.stopping && this.exitedEarly === null) {
          this.exitedEarly = `worker pid ${rec.pid} exited early (code ${code}, signal ${signal})`;
        }
      });
      child.on("error", (e) => log(`worker pid ${rec.pid}: ${e.message}`));
      this.children.push(rec);
      log(`started worker ${i} pid ${child.pid}`);
    }
  }

  checkAlive() {
    if (this.exitedEarly) throw new BenchError(this.exitedEarly);
  }

  async waitReady() {
    await waitUntil(async () => this.ready >= this.children.length, "workers ready", READY_TIMEOUT_MS, this);
  }

  /** Graceful stop, bounded; SIGKILL of the group of stragglers. Returns the
   * number of workers that did not exit cleanly. */
  async stop(graceMs = STOP_GRACE_MS) {
    this.stopping = true;
    let bad = 0;
    for (const r of this.children) {
      if (!r.exited) {
        try {
          r.child.send({ type: "stop" });
        } catch (_) {
          try { process.kill(r.pid, "SIGTERM"); } catch (_) { /* gone */ }
        }
      }
    }
    const deadline = Date.now() + graceMs;
    for (const r of this.children) {
      while (!r.exited && Date.now() < deadline) await sleep(50);
      if (!r.exited) {
        log(`worker pid ${r.pid} did not stop within ${graceMs / 1000}s: SIGKILL`);
        bad++;
        killGroup(r.pid);
        const d2 = Date.now() + 10_000;
        while (!r.exited && Date.now() < d2) await sleep(50);
        if (!r.exited) log(`worker pid ${r.pid} still alive after SIGKILL`);
      } else if (r.code !== 0) {
        log(`worker pid ${r.pid} exited with code ${r.code} signal ${r.signal}`);
        bad++;
      }
      killGroup(r.pid); // anything left in its process group
    }
    this.children = [];
    return bad;
  }

  /** Immediate kill (interrupt / fatal error path). */
  killAll() {
    this.stopping = true;
    for (const r of this.children) killGroup(r.pid);
  }
}

function killGroup(pid) {
  try {
    process.kill(-pid, "SIGKILL");
  } catch (_) {
    /* already gone */
  }
}

/** Every worker set alive, so signal handlers and fatal paths can kill them. */
const liveWorkers = new Set();

// ---------------------------------------------------------------------------
// waiting, pacing, statistics

/** Polls `check` every 100 ms until true; BenchError past `timeoutMs`. */
async function waitUntil(check, what, timeoutMs, workers = null, progress = null) {
  const start = Date.now();
  let nextReport = start + 10_000;
  for (;;) {
    if (await check()) return;
    const now = Date.now();
    if (now - start > timeoutMs) {
      const extra = progress ? ` (${await progress()})` : "";
      throw new BenchError(`${what}: not done after ${Math.round(timeoutMs / 1000)} s${extra}`);
    }
    if (workers) workers.checkAlive();
    if (progress && now >= nextReport) {
      log(`${what}: ${await progress()} after ${Math.round((now - start) / 1000)} s`);
      nextReport = now + 10_000;
    }
    await sleep(POLL_MS);
  }
}

/** Calls `send(enqueueWallMs)` `count` times at `rate`/s (absolute schedule);
 * the argument is the wall time taken just before the library's enqueue call. */
async function paced(count, rate, timeoutMs, send, workers) {
  const period = 1000 / rate;
  const t0 = performance.now();
  for (let i = 0; i < count; i++) {
    const delay = t0 + i * period - performance.now();
    if (delay > 0) await sleep(delay);
    if (performance.now() - t0 > timeoutMs) {
      throw new BenchError(`latency enqueue: only ${i}/${count} sent within ${timeoutMs / 1000} s`);
    }
    if (workers && i % 100 === 0) workers.checkAlive();
    await send(wallMs());
  }
}

/** Nearest-rank percentile (q in 0..100) of an ascending array. */
function percentile(sorted, q) {
  if (!sorted.length) return null;
  const rank = Math.max(1, Math.ceil((q / 100) * sorted.length));
  return sorted[Math.min(rank, sorted.length) - 1];
}

const round = (v, d) => (v == null ? null : Number(v.toFixed(d)));

function resultLine({ system, version, jobs, procs, settings, enqueueS, burnS, latencyJobs, latencies, errors }) {
  const s = [...latencies].sort((x, y) => x - y);
  return JSON.stringify({
    system,
    version,
    jobs,
    procs,
    settings,
    enqueue_s: round(enqueueS, 4),
    burn_s: round(burnS, 4),
    jobs_per_s: burnS > 0 ? round(jobs / burnS, 1) : null,
    latency_jobs: latencyJobs,
    latency_p50_ms: round(percentile(s, 50), 3),
    latency_p99_ms: round(percentile(s, 99), 3),
    errors,
  });
}

function emit(line) {
  process.stdout.write(line + "\n");
}

/**
 * Runs one variant: reset+schema, timed bulk enqueue, workers + burn-down,
 * paced latency jobs, stop. `impl` supplies the library-specific parts:
 *   reset(), enqueueBulk(n), remaining() -> {remaining, failed},
 *   enqueueOne(t), close(), workerConfig(variant), settings(variant),
 *   systemName(variant), version
 */
async function runVariant(args, variant, impl, script) {
  const tag = `[${variant}]`;
  log(`${tag} reset + schema`);
  await withDeadline(impl.reset(), args.phaseTimeoutMs, "reset + schema");

  log(`${tag} enqueue ${args.jobs} jobs`);
  const e0 = performance.now();
  await withDeadline(impl.enqueueBulk(args.jobs), args.phaseTimeoutMs, "enqueue");
  const enqueueS = (performance.now() - e0) / 1000;
  const c0 = await impl.remaining();
  if (c0.remaining !== args.jobs) {
    throw new BenchError(`enqueue: ${c0.remaining} runnable jobs in the table, expected ${args.jobs}`);
  }
  log(`${tag} enqueued in ${enqueueS.toFixed(3)} s (${Math.round(args.jobs / enqueueS)} jobs/s)`);

  let workers = null;
  let burnS, failed = 0, latFailed = 0, bad = 0;
  let latencies = [];
  try {
    const b0 = performance.now(); // includes node start, require, connect
    workers = new Workers(script, args.procs, { dsn: args.dsn, variant, ...impl.workerConfig(variant) });
    liveWorkers.add(workers);
    let counts = c0;
    let readyAt = null;
    await waitUntil(
      async () => {
        if (readyAt === null && workers.ready >= args.procs) readyAt = performance.now();
        counts = await impl.remaining();
        return counts.remaining === 0;
      },
      "burn-down",
      args.phaseTimeoutMs,
      workers,
      async () => `${counts.remaining} remaining, ${counts.failed} failed`,
    );
    burnS = (performance.now() - b0) / 1000;
    failed = counts.failed;
    log(
      `${tag} burn-down: ${burnS.toFixed(3)} s, ${Math.round(args.jobs / burnS)} jobs/s` +
        (readyAt !== null ? ` (workers ready after ${((readyAt - b0) / 1000).toFixed(3)} s)` : ""),
    );
    await workers.waitReady();

    if (args.latencyJobs > 0) {
      await sleep(1000); // workers idle
      workers.samples.length = 0;
      log(`${tag} latency: ${args.latencyJobs} jobs at ${args.rate}/s`);
      await withDeadline(
        paced(args.latencyJobs, args.rate, args.phaseTimeoutMs, (t) => impl.enqueueOne(t), workers),
        args.phaseTimeoutMs + 5000,
        "latency enqueue",
      );
      await waitUntil(
        async () => {
          counts = await impl.remaining();
          return counts.remaining === 0;
        },
        "latency drain",
        args.phaseTimeoutMs,
        workers,
        async () => `${counts.remaining} remaining`,
      );
      latFailed = Math.max(0, counts.failed - failed);
      // samples travel over IPC and are sent before the job is released
      const d = Date.now() + 5000;
      while (workers.samples.length < args.latencyJobs && Date.now() < d) await sleep(20);
      latencies = workers.samples.slice();
    }
  } finally {
    if (workers) {
      bad = await workers.stop();
      liveWorkers.delete(workers);
    }
  }
  const missing = Math.max(0, args.latencyJobs - latencies.length);
  const errors = failed + latFailed + missing + bad;
  if (errors) {
    log(`${tag} errors: failed jobs ${failed + latFailed}, missing latency samples ${missing}, bad worker exits ${bad}`);
  }
  return resultLine({
    system: impl.systemName(variant),
    version: impl.version,
    jobs: args.jobs,
    procs: args.procs,
    settings: impl.settings(variant, args),
    enqueueS,
    burnS,
    latencyJobs: args.latencyJobs,
    latencies,
    errors,
  });
}

async function withDeadline(promise, ms, what) {
  let timer;
  try {
    return await Promise.race([
      promise,
      new Promise((_, rej) => {
        timer = setTimeout(() => rej(new BenchError(`${what}: not done after ${ms / 1000} s`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/** Parent entry point: runs the variants, maps failures to exit codes. */
function runParent(system, script, makeImpl) {
  const args = parseCli(system, path.basename(script));
  let impl = null;
  let exiting = false;
  const die = (code) => {
    for (const w of liveWorkers) w.killAll();
    process.exit(code);
  };
  for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"]) {
    process.on(sig, () => {
      if (exiting) return;
      exiting = true;
      log(`${system}: interrupted (${sig}); stopping workers`);
      die(130);
    });
  }
  (async () => {
    impl = await makeImpl(args);
    try {
      for (const v of variants(args.variant)) {
        emit(await runVariant(args, v, impl, script));
      }
    } finally {
      await withDeadline(impl.close(), 30_000, "close").catch((e) => log(`close: ${e.message}`));
    }
  })().then(
    () => process.exit(0),
    (e) => {
      if (e instanceof BenchError) {
        log(`${system}: FAILED: ${e.message}`);
        die(2);
      } else {
        log(`${system}: ERROR: ${e && e.stack ? e.stack : e}`);
        die(1);
      }
    },
  );
}

/** Child side: config, IPC helpers, parent-death and stop handling. */
function childContext() {
  const cfg = JSON.parse(process.env.BENCH_WORKER_CONFIG);
  let stopFn = null;
  let stopping = false;
  const doStop = async (why) => {
    if (stopping) return;
    stopping = true;
    const hard = setTimeout(() => process.exit(3), STOP_GRACE_MS - 2000);
    hard.unref();
    try {
      if (stopFn) await stopFn();
      process.exitCode = why === "disconnect" ? 4 : 0;
    } catch (e) {
      log(`worker ${cfg.index}: stop failed: ${e && e.stack ? e.stack : e}`);
      process.exitCode = 5;
    }
    // make sure nothing (pools, timers) keeps us alive
    setTimeout(() => process.exit(process.exitCode), 200).unref();
    if (process.connected) process.disconnect();
  };
  process.on("message", (m) => {
    if (m && m.type === "stop") doStop("stop");
  });
  process.on("disconnect", () => doStop("disconnect")); // driver gone
  process.on("SIGTERM", () => doStop("SIGTERM"));
  process.on("SIGINT", () => {}); // the driver handles Ctrl-C
  return {
    cfg,
    onStop(fn) {
      stopFn = fn;
    },
    ready() {
      process.send({ type: "ready" });
    },
    sample(ms) {
      if (process.connected) process.send({ type: "lat", ms });
    },
  };
}

module.exports = {
  BenchError,
  Interrupted,
  log,
  sleep,
  wallMs,
  runParent,
  childContext,
  percentile,
};
