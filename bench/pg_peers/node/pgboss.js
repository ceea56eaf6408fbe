#!/usr/bin/env node
"use strict";
/**
 * pg-boss burn-down + latency driver (see README.md).
 *
 *   node bench/pg_peers/node/pgboss.js --dsn postgres://USER@127.0.0.1:PORT/DB \
 *       --jobs 200000 --latency-jobs 1000 --procs 2 [--variant default|tuned|both]
 *
 * Prints one JSON line per variant on stdout; logs on stderr.
 */

const path = require("node:path");
const common = require("./_common");
const { log, wallMs } = common;

const SYSTEM = "pg-boss";
const QUEUE = "bench_noop";
const SCHEMA = "pgboss"; // the library's default schema
const INSERT_CHUNK = 10_000; // jobs per boss.insert() call (one INSERT ... json_to_recordset)

// work() options per variant. pg-boss v10 workers poll: each work() call is
// one loop that fetches up to batchSize jobs (one UPDATE ... FOR UPDATE SKIP
// LOCKED), runs the handler on the array, completes them (one UPDATE, not
// awaited), then sleeps the rest of pollingIntervalSeconds (no LISTEN/NOTIFY).
// So a process's throughput is at most workers * batchSize / pollingInterval.
//  default: the library's defaults except batchSize. The docs' work() default
//    ("1 job every 2 seconds": batchSize 1, pollingIntervalSeconds 2) would need
//    N / (procs * 0.5) s for the burn-down (200,000 jobs, 2 processes: ~55 h);
//    batchSize 1000 at the default 2 s makes that ~1,000 jobs/s with 2 processes.
//  tuned: pollingIntervalSeconds 0.5 (the documented minimum) and batchSize
//    10000 (one fetch / one complete statement per 10,000 jobs, the same
//    granularity as the enqueue). Throughput kept rising with batchSize in a
//    sweep (see README.md), so this is a chosen cap, not a plateau.
const VARIANTS = {
  default: { workers: 1, work: { batchSize: 1000 } },
  tuned: { workers: 1, work: { batchSize: 10_000, pollingIntervalSeconds: 0.5 } },
};

function version() {
  return require("pg-boss/package.json").version;
}

function settingsText(variant, args) {
  const v = VARIANTS[variant];
  const w = v.work;
  const base =
    `${args.procs} worker processes, each new PgBoss(dsn) with constructor defaults ` +
    `(pg pool max 10, supervise+schedule on, maintenance every 120 s) and ${v.workers} work() loop; ` +
    `queue via createQueue(name) (standard policy; effective retryLimit 2, expireIn 15 min); ` +
    `handler (jobs) => Promise.allSettled(jobs.map(noop)); enqueue: boss.insert() in chunks of ${INSERT_CHUNK}; ` +
    `latency jobs: boss.send()`;
  if (variant === "default") {
    return (
      base +
      `; work() defaults (pollingIntervalSeconds=2) except batchSize=${w.batchSize} ` +
      `(the default batchSize=1 is 1 job per 2 s per worker)`
    );
  }
  return base + `; TUNED: batchSize=${w.batchSize}, pollingIntervalSeconds=${w.pollingIntervalSeconds} (documented minimum)`;
}

// ---------------------------------------------------------------------------
// parent

async function makeImpl(args) {
  const PgBoss = require("pg-boss");
  const { Pool } = require("pg");
  const pool = new Pool({ connectionString: args.dsn, max: 2, connectionTimeoutMillis: 30_000, query_timeout: 600_000 });
  pool.on("error", (e) => log(`pool: ${e.message}`));
  let boss = null;

  const stopBoss = async () => {
    if (boss) {
      const b = boss;
      boss = null;
      await b.stop({ graceful: false, wait: true, timeout: 5000 });
    }
  };

  return {
    version: version(),
    systemName: (v) => {
      if (v === "default") return `${SYSTEM} (batchSize ${VARIANTS.default.work.batchSize})`;
      const w = VARIANTS.tuned.work;
      return `${SYSTEM} (tuned: batch ${w.batchSize}, poll ${w.pollingIntervalSeconds} s)`; // <= 44 chars
    },
    settings: settingsText,
    workerConfig: (v) => ({ workers: VARIANTS[v].workers, work: VARIANTS[v].work }),

    async reset() {
      await stopBoss();
      await pool.query(`drop schema if exists ${SCHEMA} cascade`);
      boss = new PgBoss({ connectionString: args.dsn });
      boss.on("error", (e) => log(`pg-boss (driver): ${e && e.message}`));
      await boss.start(); // creates the schema (migrate: true is the default)
      await boss.createQueue(QUEUE);
      await pool.query("checkpoint").catch((e) => log(`checkpoint: ${e.message}`));
    },

    async enqueueBulk(n) {
      for (let done = 0; done < n; ) {
        const k = Math.min(INSERT_CHUNK, n - done);
        const jobs = new Array(k);
        for (let i = 0; i < k; i++) jobs[i] = { name: QUEUE, data: {} };
        await boss.insert(jobs);
        done += k;
      }
    },

    async remaining() {
      // job_state: created < retry < active < completed < cancelled < failed.
      // Completed jobs stay in pgboss.job (archived after 12 h by default).
      const { rows } = await pool.query(
        `select count(*) filter (where state in ('created', 'retry', 'active'))::int as remaining,
                count(*) filter (where state in ('failed', 'cancelled'))::int as failed
           from ${SCHEMA}.job where name = $1`,
        [QUEUE],
      );
      return rows[0];
    },

    async enqueueOne(t) {
      await boss.send(QUEUE, { t });
    },

    async close() {
      await stopBoss();
      await pool.end();
    },
  };
}

// ---------------------------------------------------------------------------
// worker child

async function childMain() {
  const ctx = common.childContext();
  const PgBoss = require("pg-boss");
  const boss = new PgBoss({ connectionString: ctx.cfg.dsn });
  boss.on("error", (e) => log(`pg-boss[${process.pid}]: ${e && e.message}`));
  await boss.start();
  const noop = async (job) => {
    if (job.data && typeof job.data.t === "number") ctx.sample(wallMs() - job.data.t);
  };
  for (let i = 0; i < ctx.cfg.workers; i++) {
    await boss.work(QUEUE, ctx.cfg.work, (jobs) => Promise.allSettled(jobs.map(noop)));
  }
  ctx.onStop(async () => {
    // graceful: wait for the work() loops to finish their current batch
    await boss.stop({ graceful: true, wait: true, timeout: 20_000 });
  });
  log(`pg-boss[${process.pid}] worker ${ctx.cfg.index}: ${ctx.cfg.workers} x work(${JSON.stringify(ctx.cfg.work)})`);
  ctx.ready();
}

if (process.argv.includes("--worker-child")) {
  childMain().catch((e) => {
    log(`pg-boss worker: ${e && e.stack ? e.stack : e}`);
    process.exit(1);
  });
} else {
  common.runParent(SYSTEM, path.resolve(__filename), makeImpl);
}
