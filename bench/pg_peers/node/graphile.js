#!/usr/bin/env node
"use strict";
/**
 * Graphile Worker burn-down + latency driver (see README.md).
 *
 *   node bench/pg_peers/node/graphile.js --dsn postgres://USER@127.0.0.1:PORT/DB \
 *       --jobs 200000 --latency-jobs 1000 --procs 2 [--variant default|tuned|both]
 *
 * Prints one JSON line per variant on stdout; logs on stderr.
 */

const path = require("node:path");
const common = require("./_common");
const { log, wallMs } = common;

const SYSTEM = "graphile-worker";
const TASK = "bench_noop";
const SCHEMA = "graphile_worker"; // the library's default schema
const ENQUEUE_CHUNK = 10_000; // jobs per graphile_worker.add_jobs() call

// Worker options per variant, passed to run() as a preset (`preset.worker`).
//  default: nothing set -> the library's defaults: concurrentJobs 1,
//    pollInterval 2000 ms, maxPoolSize 10, localQueue off (size -1),
//    completeJobBatchDelay -1 / failJobBatchDelay -1 (no batching),
//    preparedStatements true, LISTEN/NOTIFY for new jobs.
//  tuned: the configuration of the docs' Performance page ("Quick stats ... were
//    achieved with this configuration", https://worker.graphile.org/docs/performance):
//    concurrentJobs 24, maxPoolSize 25, localQueue {size: 500},
//    completeJobBatchDelay 0, failJobBatchDelay 0.
const TUNED = {
  concurrentJobs: 24,
  maxPoolSize: 25,
  localQueue: { size: 500 },
  completeJobBatchDelay: 0,
  failJobBatchDelay: 0,
};
const PRESETS = { default: {}, tuned: TUNED };

function version() {
  return require("graphile-worker/package.json").version;
}

function settingsText(variant, args) {
  const base =
    `${args.procs} worker processes, each run({taskList}) with one async no-op task; ` +
    `enqueue: SQL graphile_worker.add_jobs() in chunks of ${ENQUEUE_CHUNK}; ` +
    `latency jobs: workerUtils.addJob()`;
  if (variant === "default") {
    return (
      base +
      "; library defaults: concurrentJobs=1, pollInterval=2000ms, maxPoolSize=10, " +
      "localQueue off, completeJobBatchDelay=-1, failJobBatchDelay=-1"
    );
  }
  return (
    base +
    `; TUNED (docs Performance-page preset): concurrentJobs=${TUNED.concurrentJobs}, ` +
    `maxPoolSize=${TUNED.maxPoolSize}, localQueue.size=${TUNED.localQueue.size}, ` +
    `completeJobBatchDelay=${TUNED.completeJobBatchDelay}, failJobBatchDelay=${TUNED.failJobBatchDelay}, ` +
    "pollInterval=2000ms (default)"
  );
}

function makeLogger() {
  const { Logger } = require("graphile-worker");
  const tag = `graphile[${process.pid}]`;
  return new Logger((scope) => (level, message) => {
    if (level === "debug") return;
    const where = scope && scope.label ? `${scope.label}${scope.workerId ? "(" + scope.workerId + ")" : ""}` : "core";
    log(`${tag} ${where} ${level.toUpperCase()}: ${message}`);
  });
}

// ---------------------------------------------------------------------------
// parent

async function makeImpl(args) {
  const { Pool } = require("pg");
  const { runMigrations, makeWorkerUtils } = require("graphile-worker");
  const pool = new Pool({ connectionString: args.dsn, max: 2, connectionTimeoutMillis: 30_000, query_timeout: 600_000 });
  pool.on("error", (e) => log(`pool: ${e.message}`));
  const logger = makeLogger();
  let utils = null;

  return {
    version: version(),
    systemName: (v) => (v === "default" ? SYSTEM : `${SYSTEM} (tuned: docs perf preset)`),
    settings: settingsText,
    workerConfig: (v) => ({ preset: PRESETS[v] }),

    async reset() {
      if (utils) {
        await utils.release();
        utils = null;
      }
      await pool.query(`drop schema if exists ${SCHEMA} cascade`);
      await runMigrations({ connectionString: args.dsn, logger });
      await pool.query("checkpoint").catch((e) => log(`checkpoint: ${e.message}`));
      utils = await makeWorkerUtils({ connectionString: args.dsn, logger });
    },

    async enqueueBulk(n) {
      // The documented bulk SQL function (docs: "graphile_worker.add_jobs"; the
      // JS addJobs() is the same call returning every row), as the library's
      // own perfTest/init.js does it.
      const spec = JSON.stringify({ identifier: TASK, payload: {} });
      for (let done = 0; done < n; ) {
        const k = Math.min(ENQUEUE_CHUNK, n - done);
        const json = "[" + new Array(k).fill(spec).join(",") + "]";
        await pool.query(
          `select 1 from ${SCHEMA}.add_jobs(array(select json_populate_recordset(null::${SCHEMA}.job_spec, $1::json)))`,
          [json],
        );
        done += k;
      }
    },

    async remaining() {
      // Completed jobs are deleted; a job that failed keeps last_error (and
      // waits for its retry), so it counts as failed, not remaining.
      const { rows } = await pool.query(
        `select count(*) filter (where last_error is null)::int as remaining,
                count(*) filter (where last_error is not null)::int as failed
           from ${SCHEMA}._private_jobs`,
      );
      return rows[0];
    },

    async enqueueOne(t) {
      await utils.addJob(TASK, { t });
    },

    async close() {
      if (utils) await utils.release();
      await pool.end();
    },
  };
}

// ---------------------------------------------------------------------------
// worker child

async function childMain() {
  const ctx = common.childContext();
  const { run } = require("graphile-worker");
  const runner = await run({
    connectionString: ctx.cfg.dsn,
    noHandleSignals: true, // the driver stops us via IPC (runner.stop())
    logger: makeLogger(),
    taskList: {
      [TASK]: async (payload) => {
        if (payload && typeof payload.t === "number") ctx.sample(wallMs() - payload.t);
      },
    },
    preset: { worker: ctx.cfg.preset },
  });
  ctx.onStop(async () => {
    await runner.stop();
    await runner.promise;
  });
  ctx.ready();
}

if (process.argv.includes("--worker-child")) {
  childMain().catch((e) => {
    log(`graphile worker: ${e && e.stack ? e.stack : e}`);
    process.exit(1);
  });
} else {
  common.runParent(SYSTEM, path.resolve(__filename), makeImpl);
}
