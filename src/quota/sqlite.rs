//! `SqliteStore`: the embedded `Store`, one SQLite file (`store.path`).
//!
//! One connection, used by one writer thread that commits concurrent operations in batches
//! (group commit, see `run`), so the async request path never blocks on disk and all ledger
//! work is serialized in this process. Every operation that moves points runs in a `BEGIN IMMEDIATE` transaction: it
//! takes SQLite's write lock before reading the balance, so the quota check and the write
//! cannot interleave with another writer — even another process on the same file.
//!
//! Durability: `journal_mode=WAL` lets readers proceed during a write and makes a commit
//! a single append to the WAL; `synchronous=FULL` fsyncs the WAL on every commit. With the
//! default `NORMAL`, a commit in WAL mode survives a process crash but may be rolled back
//! by a power loss or OS crash — an acknowledged reservation would vanish while the
//! upstream task it paid for runs on. A reservation must be on disk before the request is
//! forwarded, so FULL (the default) is worth one fsync per ledger write. Deployments that
//! accept that trade for throughput set `[store] synchronous = "normal"`.

use super::cost::{is_terminal, refund_amount, task_cost, Anomaly};
use super::period::PeriodKey;
use super::store::{
    Adjustment, Delivery, DeliveryId, DeliveryState, KeyUsage, LedgerEntry, LedgerKind,
    NewDelivery, NewReservation, ReservationId, SettleResult, Settlement, Store, StoreCounts,
    StoreError, StoreFuture, TaskRecord, TaskRef, TaskState, Usage,
};
use crate::config::Synchronous;
use crate::points::Points;
use rusqlite::types::{Type, Value};
use rusqlite::{
    params, Connection, ErrorCode, OptionalExtension, Row, Savepoint, TransactionBehavior,
};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Schema migrations; `PRAGMA user_version` = how many have been applied.
/// Append only: never edit a migration that has shipped.
const MIGRATIONS: &[&str] = &[
    // 1: tasks, ledger, balances, outbox.
    "
    CREATE TABLE tasks (
        id                  INTEGER PRIMARY KEY,
        key_id              TEXT    NOT NULL,
        period              TEXT    NOT NULL,
        route               TEXT    NOT NULL,
        model               TEXT,
        seconds             INTEGER,
        callback_token      TEXT    UNIQUE,
        caller_callback_url TEXT,
        task_id             TEXT    UNIQUE,
        state               TEXT    NOT NULL
                            CHECK (state IN ('reserved', 'pending', 'settled', 'released')),
        status              TEXT    NOT NULL DEFAULT '',
        reserved_milli      INTEGER NOT NULL,
        charged_milli       INTEGER,
        raw_point           TEXT,
        raw_refund          TEXT,
        anomaly             TEXT,
        release_reason      TEXT,
        created_at          INTEGER NOT NULL,
        attached_at         INTEGER,
        updated_at          INTEGER NOT NULL,
        closed_at           INTEGER
    );
    CREATE INDEX tasks_by_state ON tasks (state, updated_at);
    CREATE INDEX tasks_by_key ON tasks (key_id, period, state);

    CREATE TABLE ledger_entries (
        id           INTEGER PRIMARY KEY,
        at           INTEGER NOT NULL,
        key_id       TEXT    NOT NULL,
        period       TEXT    NOT NULL,
        task_row     INTEGER REFERENCES tasks (id),
        kind         TEXT    NOT NULL
                     CHECK (kind IN ('reserve', 'release', 'charge', 'refund', 'adjust')),
        points_milli INTEGER NOT NULL,
        note         TEXT    NOT NULL DEFAULT ''
    );
    CREATE INDEX ledger_by_key ON ledger_entries (key_id, id);
    CREATE INDEX ledger_by_task ON ledger_entries (task_row);
    CREATE TRIGGER ledger_entries_no_update BEFORE UPDATE ON ledger_entries
    BEGIN SELECT RAISE(ABORT, 'ledger_entries is append-only'); END;
    CREATE TRIGGER ledger_entries_no_delete BEFORE DELETE ON ledger_entries
    BEGIN SELECT RAISE(ABORT, 'ledger_entries is append-only'); END;

    CREATE TABLE balances (
        key_id         TEXT    NOT NULL,
        period         TEXT    NOT NULL,
        charged_milli  INTEGER NOT NULL DEFAULT 0,
        reserved_milli INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (key_id, period)
    ) WITHOUT ROWID;

    CREATE TABLE outbox (
        id              INTEGER PRIMARY KEY,
        task_row        INTEGER NOT NULL REFERENCES tasks (id),
        key_id          TEXT    NOT NULL,
        url             TEXT    NOT NULL,
        body            BLOB    NOT NULL,
        state           TEXT    NOT NULL CHECK (state IN ('queued', 'delivered', 'dead')),
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at INTEGER NOT NULL,
        last_error      TEXT,
        created_at      INTEGER NOT NULL,
        done_at         INTEGER
    );
    CREATE INDEX outbox_due ON outbox (state, next_attempt_at);
    ",
];

/// How long a statement waits for another connection's write lock before failing with
/// "database is locked" (another process on the same file, or a migration at startup).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

pub struct SqliteStore {
    /// The one connection; the writer thread holds it for each batch (tests inspect it).
    #[cfg_attr(not(test), allow(dead_code))]
    conn: Arc<Mutex<Connection>>,
    path: Option<PathBuf>,
    /// Operations for the writer thread (see `run`).
    jobs: std::sync::mpsc::Sender<Job>,
}

/// An operation for the writer thread. It runs inside the batch transaction and returns
/// what to do once the batch's fate is known: `true` when it committed.
type Job = Box<dyn FnOnce(&mut Connection) -> Completion + Send>;
type Completion = Box<dyn FnOnce(bool) + Send>;

/// Operations committed together at most; a larger backlog is taken in several batches.
const MAX_BATCH: usize = 128;

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the ledger file and brings its schema up to date.
    /// Blocking; call at startup.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_with(path, Synchronous::Full)
    }

    /// As `open`, with the `[store] synchronous` setting.
    pub fn open_with(path: &Path, synchronous: Synchronous) -> Result<SqliteStore, StoreError> {
        let conn = Connection::open(path).map_err(|e| {
            StoreError::Database(format!(
                "store.path {}: cannot open the SQLite ledger: {e}",
                path.display()
            ))
        })?;
        SqliteStore::init(conn, Some(path.to_path_buf()), synchronous)
    }

    /// A private in-memory ledger (tests of other modules). Not durable.
    pub fn open_in_memory() -> Result<SqliteStore, StoreError> {
        SqliteStore::init(Connection::open_in_memory()?, None, Synchronous::Full)
    }

    fn init(
        mut conn: Connection,
        path: Option<PathBuf>,
        synchronous: Synchronous,
    ) -> Result<SqliteStore, StoreError> {
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // Room for every statement the ledger runs (see `cached_execute`).
        conn.set_prepared_statement_cache_capacity(64);
        // See the module comment for why WAL + FULL. (An in-memory database answers
        // "memory" to journal_mode; that is fine for it.)
        let _mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        let level = match synchronous {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", level)?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut conn)?;
        let conn = Arc::new(Mutex::new(conn));
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        let writer_conn = Arc::clone(&conn);
        std::thread::Builder::new()
            .name("gatehouse-ledger".into())
            .spawn(move || write_batches(&writer_conn, &queue))
            .map_err(|e| StoreError::Database(format!("cannot start the ledger writer: {e}")))?;
        Ok(SqliteStore { conn, path, jobs })
    }

    /// Runs `job` on the ledger's writer thread and answers once its result is durable.
    ///
    /// Group commit: the writer takes every operation waiting in the queue, runs them in one
    /// transaction (each in its own savepoint) and commits once, so concurrent requests share
    /// one fsync instead of queueing for one each. An answer is sent only after the commit.
    fn run<T, F>(&self, job: F) -> StoreFuture<'static, T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let boxed: Job = Box::new(move |conn: &mut Connection| {
            let result = job(conn);
            Box::new(move |committed: bool| {
                let result = match result {
                    Ok(_) if !committed => Err(StoreError::Database(
                        "the ledger transaction could not be committed".into(),
                    )),
                    other => other,
                };
                let _ = answer.send(result);
            })
        });
        let queued = self.jobs.send(boxed);
        Box::pin(async move {
            queued.map_err(|_| StoreError::Database("the ledger writer has stopped".into()))?;
            answered
                .await
                .map_err(|_| StoreError::Database("the ledger writer failed".into()))?
        })
    }
}

/// The writer thread: batches of operations, one transaction and one commit each.
fn write_batches(conn: &Mutex<Connection>, queue: &std::sync::mpsc::Receiver<Job>) {
    // Ends when every `SqliteStore` handle (and so every sender) is gone.
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        // A panic in an earlier batch left no transaction open (it was rolled back below or
        // by SQLite), so a poisoned lock still guards a usable connection.
        let mut conn = conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // BEGIN IMMEDIATE takes the write lock before any job reads a balance, so the quota
        // check and the write cannot interleave with another process's writer either.
        let batched = conn.execute_batch("BEGIN IMMEDIATE").is_ok();
        let mut completions: Vec<Completion> = Vec::with_capacity(batch.len());
        let mut aborted = false;
        for job in batch {
            if aborted {
                // SQLite rolled the batch back (disk full, I/O error): the jobs after that
                // point must not run as autocommit transactions of their own. Dropping a job
                // unrun drops its answer channel: its caller gets an error.
                drop(job);
                continue;
            }
            // A panicking job must not take the writer (and so the whole ledger) down.
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&mut conn))) {
                Ok(complete) => completions.push(complete),
                Err(_) => {
                    tracing::error!("a ledger operation panicked; its batch is rolled back");
                    aborted = true;
                }
            }
            if batched && conn.is_autocommit() {
                aborted = true;
            }
        }
        // Without the batch transaction each savepoint committed on its own.
        let committed = !aborted && (!batched || conn.execute_batch("COMMIT").is_ok());
        if !committed && !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        drop(conn);
        for complete in completions {
            complete(committed);
        }
    }
}

/// Applies the missing migrations, each in its own transaction with its version bump. The
/// version is re-read inside the write lock, so two processes opening a new file at once
/// do not both run a migration.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let known = MIGRATIONS.len() as i64;
    loop {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > known {
            return Err(StoreError::SchemaTooNew {
                found: version,
                known,
            });
        }
        if version == known {
            return Ok(());
        }
        tx.execute_batch(MIGRATIONS[version as usize])?;
        tx.pragma_update(None, "user_version", version + 1)?;
        tx.commit()?;
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> StoreError {
        match &error {
            rusqlite::Error::SqliteFailure(failure, _)
                if failure.code == ErrorCode::ConstraintViolation =>
            {
                StoreError::Conflict(error.to_string())
            }
            _ => StoreError::Database(error.to_string()),
        }
    }
}

const TASK_COLUMNS: &str = "id, key_id, period, route, model, seconds, callback_token, \
    caller_callback_url, task_id, state, status, reserved_milli, charged_milli, raw_point, \
    raw_refund, anomaly, release_reason, created_at, attached_at, updated_at, closed_at";

fn bad_column(index: usize, what: &str, text: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        index,
        Type::Text,
        format!("unexpected {what} {text:?} in the ledger").into(),
    )
}

fn task_from_row(row: &Row<'_>) -> rusqlite::Result<TaskRecord> {
    let state: String = row.get(9)?;
    let anomaly: Option<String> = row.get(15)?;
    Ok(TaskRecord {
        id: ReservationId(row.get(0)?),
        key_id: row.get(1)?,
        period: PeriodKey::from_stored(row.get(2)?),
        route: row.get(3)?,
        model: row.get(4)?,
        seconds: row.get(5)?,
        callback_token: row.get(6)?,
        caller_callback_url: row.get(7)?,
        task_id: row.get(8)?,
        state: TaskState::parse(&state).ok_or_else(|| bad_column(9, "task state", &state))?,
        status: row.get(10)?,
        reserved: Points::from_milli(row.get(11)?),
        charged: row.get::<_, Option<i64>>(12)?.map(Points::from_milli),
        raw_point: row.get(13)?,
        raw_refund: row.get(14)?,
        anomaly: match anomaly {
            None => None,
            Some(label) => {
                Some(Anomaly::from_label(&label).ok_or_else(|| bad_column(15, "anomaly", &label))?)
            }
        },
        release_reason: row.get(16)?,
        created_at: row.get(17)?,
        attached_at: row.get(18)?,
        updated_at: row.get(19)?,
        closed_at: row.get(20)?,
    })
}

/// The `WHERE` condition (on parameter `?1`) that selects the task `by` names.
fn task_condition(by: &TaskRef) -> (&'static str, Value) {
    match by {
        TaskRef::TaskId(id) => ("task_id = ?1", Value::Text(id.clone())),
        TaskRef::CallbackToken(token) => ("callback_token = ?1", Value::Text(token.clone())),
        TaskRef::Reservation(id) => ("id = ?1", Value::Integer(id.0)),
    }
}

fn find_task(conn: &Connection, by: &TaskRef) -> Result<Option<TaskRecord>, StoreError> {
    let (condition, value) = task_condition(by);
    let sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE {condition}");
    Ok(cached_query_row(conn, &sql, [value], task_from_row).optional()?)
}

fn select_tasks(
    conn: &Connection,
    condition: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<TaskRecord>, StoreError> {
    let sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE {condition}");
    let mut statement = conn.prepare(&sql)?;
    let rows = statement.query_map(params, task_from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// (charged, reserved) of a key in a period; zeros when it has no row yet.
fn balance(
    conn: &Connection,
    key_id: &str,
    period: &PeriodKey,
) -> Result<(Points, Points), StoreError> {
    let row = conn
        .prepare_cached(
            "SELECT charged_milli, reserved_milli FROM balances WHERE key_id = ?1 AND period = ?2",
        )?
        .query_row(params![key_id, period.as_str()], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
        })
        .optional()?;
    let (charged, reserved) = row.unwrap_or((0, 0));
    Ok((Points::from_milli(charged), Points::from_milli(reserved)))
}

fn bump_balance(
    tx: &Connection,
    key_id: &str,
    period: &PeriodKey,
    charged: Points,
    reserved: Points,
) -> Result<(), StoreError> {
    cached_execute(
        tx,
        "INSERT INTO balances (key_id, period, charged_milli, reserved_milli)
         VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (key_id, period) DO UPDATE SET
             charged_milli = charged_milli + excluded.charged_milli,
             reserved_milli = reserved_milli + excluded.reserved_milli",
        params![key_id, period.as_str(), charged.milli(), reserved.milli()],
    )?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn append_ledger(
    tx: &Connection,
    at: i64,
    key_id: &str,
    period: &PeriodKey,
    task_row: Option<ReservationId>,
    kind: LedgerKind,
    points: Points,
    note: &str,
) -> Result<(), StoreError> {
    cached_execute(
        tx,
        "INSERT INTO ledger_entries (at, key_id, period, task_row, kind, points_milli, note)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            at,
            key_id,
            period.as_str(),
            task_row.map(|r| r.0),
            kind.as_str(),
            points.milli(),
            note
        ],
    )?;
    Ok(())
}

/// One operation's transaction: a savepoint inside the writer's batch transaction (see
/// `run`), so a failed operation (over quota, a conflict) rolls back alone.
/// `execute` with the statement prepared once per connection: every ledger operation runs
/// the same few statements, and parsing them again each time was a large share of its cost.
fn cached_execute<P: rusqlite::Params>(
    conn: &Connection,
    sql: &str,
    params: P,
) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(params)
}

/// `query_row` with a cached statement (see `cached_execute`).
fn cached_query_row<T, P, F>(conn: &Connection, sql: &str, params: P, f: F) -> rusqlite::Result<T>
where
    P: rusqlite::Params,
    F: FnOnce(&Row<'_>) -> rusqlite::Result<T>,
{
    conn.prepare_cached(sql)?.query_row(params, f)
}

fn immediate(conn: &mut Connection) -> Result<Savepoint<'_>, StoreError> {
    Ok(conn.savepoint()?)
}

fn reserve_tx(conn: &mut Connection, r: NewReservation) -> Result<ReservationId, StoreError> {
    if r.price < Points::ZERO {
        return Err(StoreError::Invalid(format!(
            "price for route {}: must not be negative, got {}",
            r.route, r.price
        )));
    }
    let tx = immediate(conn)?;
    let (used, reserved) = balance(&tx, &r.key_id, &r.period)?;
    if let Some(quota) = r.quota {
        if used.saturating_add(reserved).saturating_add(r.price) > quota {
            return Err(StoreError::QuotaExceeded {
                key_id: r.key_id,
                period: r.period,
                used,
                reserved,
                quota,
                price: r.price,
            });
        }
    }
    cached_execute(
        &tx,
        "INSERT INTO tasks (key_id, period, route, model, seconds, callback_token,
                            caller_callback_url, state, reserved_milli, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'reserved', ?8, ?9, ?9)",
        params![
            r.key_id,
            r.period.as_str(),
            r.route,
            r.model,
            r.seconds,
            r.callback_token,
            r.caller_callback_url,
            r.price.milli(),
            r.now
        ],
    )?;
    let id = ReservationId(tx.last_insert_rowid());
    append_ledger(
        &tx,
        r.now,
        &r.key_id,
        &r.period,
        Some(id),
        LedgerKind::Reserve,
        r.price,
        &format!("route {}", r.route),
    )?;
    bump_balance(&tx, &r.key_id, &r.period, Points::ZERO, r.price)?;
    tx.commit()?;
    Ok(id)
}

fn attach_tx(
    conn: &mut Connection,
    id: ReservationId,
    task_id: String,
    now: i64,
) -> Result<TaskState, StoreError> {
    let tx = immediate(conn)?;
    let changed = tx
        .prepare_cached(
            "UPDATE tasks SET
                 task_id = ?2,
                 attached_at = COALESCE(attached_at, ?3),
                 updated_at = ?3,
                 state = CASE state WHEN 'reserved' THEN 'pending' ELSE state END
             WHERE id = ?1 AND (task_id IS NULL OR task_id = ?2)",
        )?
        .execute(params![id.0, task_id, now])
        .map_err(|e| match StoreError::from(e) {
            StoreError::Conflict(_) => StoreError::Conflict(format!(
                "task_id {task_id:?} is already attached to another reservation"
            )),
            other => other,
        })?;
    let task = find_task(&tx, &TaskRef::Reservation(id))?
        .ok_or_else(|| StoreError::NotFound(format!("reservation {id}")))?;
    if changed == 0 {
        return Err(StoreError::Conflict(format!(
            "reservation {id} already has task_id {:?}, not {task_id:?}",
            task.task_id.unwrap_or_default()
        )));
    }
    tx.commit()?;
    Ok(task.state)
}

fn release_tx(
    conn: &mut Connection,
    id: ReservationId,
    reason: String,
    now: i64,
) -> Result<bool, StoreError> {
    let tx = immediate(conn)?;
    let task = find_task(&tx, &TaskRef::Reservation(id))?
        .ok_or_else(|| StoreError::NotFound(format!("reservation {id}")))?;
    let changed = cached_execute(
        &tx,
        "UPDATE tasks SET state = 'released', release_reason = ?2, updated_at = ?3, closed_at = ?3
         WHERE id = ?1 AND state = 'reserved'",
        params![id.0, reason, now],
    )?;
    if changed == 0 {
        return Ok(false);
    }
    append_ledger(
        &tx,
        now,
        &task.key_id,
        &task.period,
        Some(id),
        LedgerKind::Release,
        task.reserved,
        &reason,
    )?;
    bump_balance(
        &tx,
        &task.key_id,
        &task.period,
        Points::ZERO,
        Points::ZERO.saturating_sub(task.reserved),
    )?;
    tx.commit()?;
    Ok(true)
}

fn settle_tx(conn: &mut Connection, s: Settlement) -> Result<SettleResult, StoreError> {
    let status = s.status.trim();
    if !is_terminal(status) {
        return Err(StoreError::NotTerminal {
            status: s.status.clone(),
        });
    }
    let tx = immediate(conn)?;
    let Some(task) = find_task(&tx, &s.by)? else {
        return Ok(SettleResult::NotFound);
    };
    let (charged, anomaly) = task_cost(status, &s.raw_point, &s.raw_refund, task.reserved);
    // The conditional update is what makes settlement exactly-once: a duplicate finds the
    // state `settled` and changes nothing. `released` is included on purpose: a submit that
    // timed out may still have created the task upstream, and its late terminal callback
    // (found by token) must charge what the upstream charged us.
    let changed = cached_execute(
        &tx,
        "UPDATE tasks SET state = 'settled', status = ?2, charged_milli = ?3, raw_point = ?4,
                          raw_refund = ?5, anomaly = ?6, updated_at = ?7, closed_at = ?7
         WHERE id = ?1 AND state IN ('reserved', 'pending', 'released')",
        params![
            task.id.0,
            status,
            charged.milli(),
            s.raw_point,
            s.raw_refund,
            anomaly.map(Anomaly::label),
            s.now
        ],
    )?;
    if changed == 0 {
        return Ok(SettleResult::AlreadySettled);
    }
    let reservation = if task.state == TaskState::Released {
        Points::ZERO // given back when it was released
    } else {
        task.reserved
    };
    let (key, period, row) = (&task.key_id, &task.period, Some(task.id));
    if task.state != TaskState::Released {
        append_ledger(
            &tx,
            s.now,
            key,
            period,
            row,
            LedgerKind::Release,
            reservation,
            "settled",
        )?;
    }
    let note = match anomaly {
        Some(a) => format!(
            "status {status}, point {:?}, refund {:?}, {a}",
            s.raw_point, s.raw_refund
        ),
        None => format!(
            "status {status}, point {:?}, refund {:?}",
            s.raw_point, s.raw_refund
        ),
    };
    append_ledger(
        &tx,
        s.now,
        key,
        period,
        row,
        LedgerKind::Charge,
        charged,
        &note,
    )?;
    if let Some(refund) = refund_amount(&s.raw_refund) {
        append_ledger(
            &tx,
            s.now,
            key,
            period,
            row,
            LedgerKind::Refund,
            refund,
            "upstream refund; informative, the charge row already accounts for it",
        )?;
    }
    bump_balance(
        &tx,
        key,
        period,
        charged,
        Points::ZERO.saturating_sub(reservation),
    )?;
    tx.commit()?;
    Ok(SettleResult::Settled {
        key_id: task.key_id,
        charged,
        reservation,
        from: task.state,
        anomaly,
    })
}

fn usage_of(conn: &Connection, key_id: &str, period: &PeriodKey) -> Result<Usage, StoreError> {
    let (charged, reserved) = balance(conn, key_id, period)?;
    let open_tasks: i64 = cached_query_row(
        conn,
        "SELECT COUNT(*) FROM tasks
         WHERE key_id = ?1 AND period = ?2 AND state IN ('reserved', 'pending')",
        params![key_id, period.as_str()],
        |r| r.get(0),
    )?;
    Ok(Usage {
        charged,
        reserved,
        open_tasks: open_tasks as u64,
    })
}

fn ledger_tx(
    conn: &Connection,
    key_id: &str,
    task_id: Option<&str>,
) -> Result<Vec<LedgerEntry>, StoreError> {
    let mut statement = conn.prepare(
        "SELECT l.id, l.at, l.key_id, l.period, l.task_row, t.task_id, l.kind, l.points_milli, l.note
         FROM ledger_entries l LEFT JOIN tasks t ON t.id = l.task_row
         WHERE l.key_id = ?1 AND (?2 IS NULL OR t.task_id = ?2)
         ORDER BY l.id",
    )?;
    let rows = statement.query_map(params![key_id, task_id], |row| {
        let kind: String = row.get(6)?;
        Ok(LedgerEntry {
            id: row.get(0)?,
            at: row.get(1)?,
            key_id: row.get(2)?,
            period: PeriodKey::from_stored(row.get(3)?),
            reservation: row.get::<_, Option<i64>>(4)?.map(ReservationId),
            task_id: row.get(5)?,
            kind: LedgerKind::parse(&kind).ok_or_else(|| bad_column(6, "ledger kind", &kind))?,
            points: Points::from_milli(row.get(7)?),
            note: row.get(8)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

const DELIVERY_COLUMNS: &str = "id, task_row, key_id, url, body, state, attempts, \
    next_attempt_at, last_error, created_at, done_at";

fn delivery_from_row(row: &Row<'_>) -> rusqlite::Result<Delivery> {
    let state: String = row.get(5)?;
    Ok(Delivery {
        id: DeliveryId(row.get(0)?),
        reservation: ReservationId(row.get(1)?),
        key_id: row.get(2)?,
        url: row.get(3)?,
        body: row.get(4)?,
        state: DeliveryState::parse(&state)
            .ok_or_else(|| bad_column(5, "delivery state", &state))?,
        attempts: row.get(6)?,
        next_attempt_at: row.get(7)?,
        last_error: row.get(8)?,
        created_at: row.get(9)?,
        done_at: row.get(10)?,
    })
}

fn due_tx(
    conn: &mut Connection,
    now: i64,
    lease_until: i64,
    limit: u32,
) -> Result<Vec<Delivery>, StoreError> {
    let tx = immediate(conn)?;
    let due: Vec<Delivery> = {
        let sql = format!(
            "SELECT {DELIVERY_COLUMNS} FROM outbox
             WHERE state = 'queued' AND next_attempt_at <= ?1
             ORDER BY next_attempt_at, id LIMIT ?2"
        );
        let mut statement = tx.prepare(&sql)?;
        let rows = statement.query_map(params![now, limit], delivery_from_row)?;
        rows.collect::<Result<_, _>>()?
    };
    let mut leased = Vec::with_capacity(due.len());
    for mut delivery in due {
        cached_execute(
            &tx,
            "UPDATE outbox SET next_attempt_at = ?2 WHERE id = ?1",
            params![delivery.id.0, lease_until],
        )?;
        delivery.next_attempt_at = lease_until;
        leased.push(delivery);
    }
    tx.commit()?;
    Ok(leased)
}

impl Store for SqliteStore {
    fn reserve(&self, reservation: NewReservation) -> StoreFuture<'_, ReservationId> {
        self.run(move |conn| reserve_tx(conn, reservation))
    }

    fn attach(
        &self,
        reservation: ReservationId,
        task_id: &str,
        now: i64,
    ) -> StoreFuture<'_, TaskState> {
        let task_id = task_id.to_string();
        self.run(move |conn| attach_tx(conn, reservation, task_id, now))
    }

    fn release(&self, reservation: ReservationId, reason: &str, now: i64) -> StoreFuture<'_, bool> {
        let reason = reason.to_string();
        self.run(move |conn| release_tx(conn, reservation, reason, now))
    }

    fn settle(&self, settlement: Settlement) -> StoreFuture<'_, SettleResult> {
        self.run(move |conn| settle_tx(conn, settlement))
    }

    fn update_status(&self, task: TaskRef, status: &str, now: i64) -> StoreFuture<'_, bool> {
        let status = status.trim().to_string();
        self.run(move |conn| {
            let (condition, value) = task_condition(&task);
            let sql = format!(
                "UPDATE tasks SET status = ?2, updated_at = ?3
                 WHERE {condition} AND state IN ('reserved', 'pending')"
            );
            Ok(cached_execute(conn, &sql, params![value, status, now])? > 0)
        })
    }

    fn task(&self, task: TaskRef) -> StoreFuture<'_, Option<TaskRecord>> {
        self.run(move |conn| find_task(conn, &task))
    }

    fn usage(&self, key_id: &str, period: PeriodKey) -> StoreFuture<'_, Usage> {
        let key_id = key_id.to_string();
        self.run(move |conn| usage_of(conn, &key_id, &period))
    }

    fn committed(&self, key_id: &str, period: PeriodKey) -> StoreFuture<'_, Usage> {
        let key_id = key_id.to_string();
        self.run(move |conn| {
            let (charged, reserved) = balance(conn, &key_id, &period)?;
            Ok(Usage {
                charged,
                reserved,
                open_tasks: 0,
            })
        })
    }

    fn usage_all<'a>(
        &'a self,
        period_of: &'a (dyn Fn(&str) -> PeriodKey + Send + Sync),
    ) -> StoreFuture<'a, Vec<KeyUsage>> {
        Box::pin(async move {
            // Every reservation writes a balance row, so balances know every key.
            let keys: Vec<String> = self
                .run(|conn| {
                    let mut statement =
                        conn.prepare("SELECT DISTINCT key_id FROM balances ORDER BY key_id")?;
                    let rows = statement.query_map([], |r| r.get(0))?;
                    Ok(rows.collect::<Result<_, _>>()?)
                })
                .await?;
            // The caller's function runs here, not on the blocking pool, so it may borrow.
            let wanted: Vec<(String, PeriodKey)> = keys
                .into_iter()
                .map(|key| {
                    let period = period_of(&key);
                    (key, period)
                })
                .collect();
            self.run(move |conn| {
                wanted
                    .into_iter()
                    .map(|(key_id, period)| {
                        let usage = usage_of(conn, &key_id, &period)?;
                        Ok(KeyUsage {
                            key_id,
                            period,
                            usage,
                        })
                    })
                    .collect()
            })
            .await
        })
    }

    fn pending_tasks(&self, created_before: i64, limit: u32) -> StoreFuture<'_, Vec<TaskRecord>> {
        self.run(move |conn| {
            select_tasks(
                conn,
                "state = 'pending' AND task_id IS NOT NULL AND created_at <= ?1
                 ORDER BY updated_at, id LIMIT ?2",
                params![created_before, limit],
            )
        })
    }

    fn stale_reservations(
        &self,
        created_before: i64,
        limit: u32,
    ) -> StoreFuture<'_, Vec<TaskRecord>> {
        self.run(move |conn| {
            select_tasks(
                conn,
                "state = 'reserved' AND task_id IS NULL AND created_at <= ?1
                 ORDER BY created_at, id LIMIT ?2",
                params![created_before, limit],
            )
        })
    }

    fn ledger_entries(
        &self,
        key_id: &str,
        task_id: Option<&str>,
    ) -> StoreFuture<'_, Vec<LedgerEntry>> {
        let key_id = key_id.to_string();
        let task_id = task_id.map(str::to_string);
        self.run(move |conn| ledger_tx(conn, &key_id, task_id.as_deref()))
    }

    fn adjust(&self, a: Adjustment) -> StoreFuture<'_, ()> {
        self.run(move |conn| {
            let tx = immediate(conn)?;
            append_ledger(
                &tx,
                a.now,
                &a.key_id,
                &a.period,
                None,
                LedgerKind::Adjust,
                a.points,
                &a.note,
            )?;
            bump_balance(&tx, &a.key_id, &a.period, a.points, Points::ZERO)?;
            tx.commit()?;
            Ok(())
        })
    }

    fn enqueue_delivery(&self, d: NewDelivery) -> StoreFuture<'_, DeliveryId> {
        self.run(move |conn| {
            cached_execute(conn,
                "INSERT INTO outbox (task_row, key_id, url, body, state, next_attempt_at, created_at)
                 VALUES (?1, ?2, ?3, ?4, 'queued', ?5, ?5)",
                params![d.reservation.0, d.key_id, d.url, d.body, d.now],
            )
            .map_err(|e| match StoreError::from(e) {
                StoreError::Conflict(_) => {
                    StoreError::NotFound(format!("reservation {} for the delivery", d.reservation))
                }
                other => other,
            })?;
            Ok(DeliveryId(conn.last_insert_rowid()))
        })
    }

    fn due_deliveries(
        &self,
        now: i64,
        lease_until: i64,
        limit: u32,
    ) -> StoreFuture<'_, Vec<Delivery>> {
        self.run(move |conn| due_tx(conn, now, lease_until, limit))
    }

    fn delivery(&self, id: DeliveryId) -> StoreFuture<'_, Option<Delivery>> {
        self.run(move |conn| {
            let sql = format!("SELECT {DELIVERY_COLUMNS} FROM outbox WHERE id = ?1");
            Ok(cached_query_row(conn, &sql, [id.0], delivery_from_row).optional()?)
        })
    }

    fn mark_delivered(&self, id: DeliveryId, now: i64) -> StoreFuture<'_, bool> {
        self.run(move |conn| {
            let changed = cached_execute(
                conn,
                "UPDATE outbox SET state = 'delivered', attempts = attempts + 1, done_at = ?2
                 WHERE id = ?1 AND state = 'queued'",
                params![id.0, now],
            )?;
            Ok(changed > 0)
        })
    }

    fn mark_attempt_failed(
        &self,
        id: DeliveryId,
        next_attempt_at: i64,
        error: &str,
    ) -> StoreFuture<'_, bool> {
        let error = error.to_string();
        self.run(move |conn| {
            let changed = cached_execute(
                conn,
                "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?2, last_error = ?3
                 WHERE id = ?1 AND state = 'queued'",
                params![id.0, next_attempt_at, error],
            )?;
            Ok(changed > 0)
        })
    }

    fn mark_dead(&self, id: DeliveryId, error: &str, now: i64) -> StoreFuture<'_, bool> {
        let error = error.to_string();
        self.run(move |conn| {
            let changed = cached_execute(
                conn,
                "UPDATE outbox SET state = 'dead', attempts = attempts + 1, last_error = ?2,
                                   done_at = ?3
                 WHERE id = ?1 AND state = 'queued'",
                params![id.0, error, now],
            )?;
            Ok(changed > 0)
        })
    }

    fn counts(&self) -> StoreFuture<'_, StoreCounts> {
        self.run(|conn| {
            let count = |sql: &str| -> Result<u64, StoreError> {
                let n: i64 = cached_query_row(conn, sql, [], |r| r.get(0))?;
                Ok(n as u64)
            };
            Ok(StoreCounts {
                reserved_tasks: count("SELECT COUNT(*) FROM tasks WHERE state = 'reserved'")?,
                pending_tasks: count("SELECT COUNT(*) FROM tasks WHERE state = 'pending'")?,
                queued_deliveries: count("SELECT COUNT(*) FROM outbox WHERE state = 'queued'")?,
                dead_deliveries: count("SELECT COUNT(*) FROM outbox WHERE state = 'dead'")?,
            })
        })
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        self.run(|conn| {
            // Reads the schema page, so a vanished or unreadable file shows up here.
            let _: i64 =
                cached_query_row(conn, "SELECT COUNT(*) FROM sqlite_master", [], |r| r.get(0))?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::QuotaPeriod;
    use crate::quota::period::{Clock, ManualClock};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::collections::HashMap;
    use tempfile::TempDir;

    const T0: i64 = 1_795_564_000; // 2026-11-24T23:46:40Z

    fn pts(whole: i64) -> Points {
        Points::from_whole(whole)
    }

    fn day() -> PeriodKey {
        PeriodKey::at(QuotaPeriod::Daily, T0)
    }

    fn open_temp() -> (TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("ledger.db")).unwrap();
        (dir, store)
    }

    fn reservation(key: &str, quota: Option<i64>, price: i64, token: &str) -> NewReservation {
        NewReservation {
            key_id: key.to_string(),
            period: day(),
            quota: quota.map(pts),
            price: pts(price),
            callback_token: Some(token.to_string()),
            caller_callback_url: Some(format!("https://caller.example/hook/{token}")),
            route: "runway_generate".to_string(),
            model: Some("gen3".to_string()),
            seconds: Some(10),
            now: T0,
        }
    }

    fn settlement(by: TaskRef, status: &str, point: &str, refund: &str) -> Settlement {
        Settlement {
            by,
            status: status.to_string(),
            raw_point: point.to_string(),
            raw_refund: refund.to_string(),
            now: T0 + 100,
        }
    }

    fn kinds(entries: &[LedgerEntry]) -> Vec<(LedgerKind, Points)> {
        entries.iter().map(|e| (e.kind, e.points)).collect()
    }

    #[tokio::test]
    async fn reserve_within_and_over_quota() {
        let (_dir, store) = open_temp();
        store
            .reserve(reservation("alice", Some(1000), 400, "t1"))
            .await
            .unwrap();
        store
            .reserve(reservation("alice", Some(1000), 400, "t2"))
            .await
            .unwrap();
        let err = store
            .reserve(reservation("alice", Some(1000), 400, "t3"))
            .await
            .unwrap_err();
        assert_eq!(
            err,
            StoreError::QuotaExceeded {
                key_id: "alice".into(),
                period: day(),
                used: Points::ZERO,
                reserved: pts(800),
                quota: pts(1000),
                price: pts(400),
            }
        );
        // Exactly at the quota is allowed.
        store
            .reserve(reservation("alice", Some(1000), 200, "t4"))
            .await
            .unwrap();
        // The rejected one left no trace.
        assert!(store.task_by_token("t3").await.unwrap().is_none());
        let usage = store.usage("alice", day()).await.unwrap();
        assert_eq!(
            usage,
            Usage {
                charged: Points::ZERO,
                reserved: pts(1000),
                open_tasks: 3
            }
        );
        assert_eq!(store.ledger_entries("alice", None).await.unwrap().len(), 3);
        // Another key has its own balance.
        store
            .reserve(reservation("bob", Some(400), 400, "b1"))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn no_quota_is_unlimited_and_negative_price_is_refused() {
        let (_dir, store) = open_temp();
        for i in 0..3 {
            store
                .reserve(reservation("alice", None, 1_000_000_000, &format!("t{i}")))
                .await
                .unwrap();
        }
        assert_eq!(
            store.usage("alice", day()).await.unwrap().reserved,
            pts(3_000_000_000)
        );
        let err = store
            .reserve(reservation("alice", None, -1, "neg"))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    }

    #[tokio::test]
    async fn duplicate_callback_token_is_a_conflict() {
        let (_dir, store) = open_temp();
        store
            .reserve(reservation("alice", None, 10, "same"))
            .await
            .unwrap();
        let err = store
            .reserve(reservation("alice", None, 10, "same"))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
        assert_eq!(store.usage("alice", day()).await.unwrap().reserved, pts(10));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_reserves_on_one_store_never_exceed_the_quota() {
        let (_dir, store) = open_temp();
        let store: Arc<dyn Store> = Arc::new(store);
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    store
                        .reserve(reservation("alice", Some(500), 100, &format!("t{i}")))
                        .await
                })
            })
            .collect();
        let mut ok = 0;
        for handle in handles {
            match handle.await.unwrap() {
                Ok(_) => ok += 1,
                Err(StoreError::QuotaExceeded { .. }) => {}
                Err(other) => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(ok, 5);
        let usage = store.usage("alice", day()).await.unwrap();
        assert_eq!(usage.reserved, pts(500));
        assert_eq!(usage.open_tasks, 5);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_reserves_through_separate_connections_never_exceed_the_quota() {
        // Eight stores on one file behave like eight processes: only BEGIN IMMEDIATE
        // (SQLite's write lock) keeps the check-then-insert atomic.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let stores: Vec<Arc<SqliteStore>> = (0..8)
            .map(|_| Arc::new(SqliteStore::open(&path).unwrap()))
            .collect();
        let handles: Vec<_> = stores
            .iter()
            .enumerate()
            .map(|(i, store)| {
                let store = Arc::clone(store);
                tokio::spawn(async move {
                    store
                        .reserve(reservation("alice", Some(300), 100, &format!("t{i}")))
                        .await
                })
            })
            .collect();
        let mut ok = 0;
        for handle in handles {
            match handle.await.unwrap() {
                Ok(_) => ok += 1,
                Err(StoreError::QuotaExceeded { .. }) => {}
                Err(other) => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(ok, 3);
        let usage = stores[0].usage("alice", day()).await.unwrap();
        assert_eq!((usage.reserved, usage.open_tasks), (pts(300), 3));
    }

    #[tokio::test]
    async fn attach_then_settle_charges_point_minus_refund() {
        let (_dir, store) = open_temp();
        let id = store
            .reserve(reservation("alice", Some(1000), 400, "tok"))
            .await
            .unwrap();
        assert_eq!(
            store.attach(id, "task-1", T0 + 5).await.unwrap(),
            TaskState::Pending
        );
        // Attaching the same id again is harmless.
        assert_eq!(
            store.attach(id, "task-1", T0 + 6).await.unwrap(),
            TaskState::Pending
        );

        let task = store.task_by_id("task-1").await.unwrap().unwrap();
        assert_eq!((task.id, task.state), (id, TaskState::Pending));
        assert_eq!(task.key_id, "alice");
        assert_eq!(task.attached_at, Some(T0 + 5));
        assert_eq!(
            task.caller_callback_url.as_deref(),
            Some("https://caller.example/hook/tok")
        );

        let result = store
            .settle(settlement(
                TaskRef::TaskId("task-1".into()),
                "3",
                "320",
                "20",
            ))
            .await
            .unwrap();
        assert_eq!(
            result,
            SettleResult::Settled {
                key_id: "alice".into(),
                charged: pts(300),
                reservation: pts(400),
                from: TaskState::Pending,
                anomaly: None,
            }
        );
        let usage = store.usage("alice", day()).await.unwrap();
        assert_eq!(
            usage,
            Usage {
                charged: pts(300),
                reserved: Points::ZERO,
                open_tasks: 0
            }
        );
        let task = store.task_by_token("tok").await.unwrap().unwrap();
        assert_eq!(task.state, TaskState::Settled);
        assert_eq!(task.status, "3");
        assert_eq!(task.charged, Some(pts(300)));
        assert_eq!(task.raw_point.as_deref(), Some("320"));
        assert_eq!(task.raw_refund.as_deref(), Some("20"));
        assert_eq!(task.closed_at, Some(T0 + 100));

        let entries = store.ledger_entries("alice", Some("task-1")).await.unwrap();
        assert_eq!(
            kinds(&entries),
            vec![
                (LedgerKind::Reserve, pts(400)),
                (LedgerKind::Release, pts(400)),
                (LedgerKind::Charge, pts(300)),
                (LedgerKind::Refund, pts(20)),
            ]
        );
        assert!(entries
            .iter()
            .all(|e| e.task_id.as_deref() == Some("task-1")));
        assert!(store
            .ledger_entries("alice", Some("other"))
            .await
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn settle_twice_charges_once() {
        let (_dir, store) = open_temp();
        let id = store
            .reserve(reservation("alice", None, 400, "tok"))
            .await
            .unwrap();
        store.attach(id, "task-1", T0).await.unwrap();
        let by = TaskRef::TaskId("task-1".into());
        let first = store
            .settle(settlement(by.clone(), "3", "320", "0"))
            .await
            .unwrap();
        assert!(matches!(first, SettleResult::Settled { .. }));
        for by in [
            by,
            TaskRef::CallbackToken("tok".into()),
            TaskRef::Reservation(id),
        ] {
            let again = store.settle(settlement(by, "3", "999", "0")).await.unwrap();
            assert_eq!(again, SettleResult::AlreadySettled);
        }
        let usage = store.usage("alice", day()).await.unwrap();
        assert_eq!((usage.charged, usage.reserved), (pts(320), Points::ZERO));
        let charges = store.ledger_entries("alice", None).await.unwrap();
        assert_eq!(
            charges
                .iter()
                .filter(|e| e.kind == LedgerKind::Charge)
                .count(),
            1
        );
    }

    #[tokio::test]
    async fn callback_before_attach_settles_and_attach_keeps_it_settled() {
        let (_dir, store) = open_temp();
        let id = store
            .reserve(reservation("alice", None, 400, "tok"))
            .await
            .unwrap();
        let result = store
            .settle(settlement(
                TaskRef::CallbackToken("tok".into()),
                "3",
                "320",
                "0",
            ))
            .await
            .unwrap();
        assert!(
            matches!(
                result,
                SettleResult::Settled {
                    from: TaskState::Reserved,
                    ..
                }
            ),
            "{result:?}"
        );
        assert_eq!(
            store.attach(id, "task-1", T0 + 200).await.unwrap(),
            TaskState::Settled
        );
        let task = store.task_by_id("task-1").await.unwrap().unwrap();
        assert_eq!(task.state, TaskState::Settled);
        assert_eq!(task.charged, Some(pts(320)));
        // Release after the fact does nothing either.
        assert!(!store
            .release(id, "late submit error", T0 + 201)
            .await
            .unwrap());
        let usage = store.usage("alice", day()).await.unwrap();
        assert_eq!((usage.charged, usage.reserved), (pts(320), Points::ZERO));
        // The reconciler's duplicate finds it settled.
        let again = store
            .settle(settlement(
                TaskRef::TaskId("task-1".into()),
                "3",
                "320",
                "0",
            ))
            .await
            .unwrap();
        assert_eq!(again, SettleResult::AlreadySettled);
    }

    #[tokio::test]
    async fn release_only_from_reserved_and_only_once() {
        let (_dir, store) = open_temp();
        let id = store
            .reserve(reservation("alice", Some(500), 400, "tok"))
            .await
            .unwrap();
        assert!(store
            .release(id, "upstream code 403", T0 + 1)
            .await
            .unwrap());
        assert!(!store.release(id, "again", T0 + 2).await.unwrap());
        let task = store.task(TaskRef::Reservation(id)).await.unwrap().unwrap();
        assert_eq!(task.state, TaskState::Released);
        assert_eq!(task.release_reason.as_deref(), Some("upstream code 403"));
        assert_eq!(store.usage("alice", day()).await.unwrap(), Usage::default());
        // The quota is free again.
        store
            .reserve(reservation("alice", Some(500), 400, "tok2"))
            .await
            .unwrap();

        let attached = store
            .reserve(reservation("bob", None, 100, "b"))
            .await
            .unwrap();
        store.attach(attached, "task-b", T0).await.unwrap();
        assert!(!store.release(attached, "too late", T0).await.unwrap());
        assert_eq!(store.usage("bob", day()).await.unwrap().reserved, pts(100));

        let err = store
            .release(ReservationId(999), "x", T0)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    }

    #[tokio::test]
    async fn late_callback_after_release_charges_without_touching_reserved() {
        let (_dir, store) = open_temp();
        let id = store
            .reserve(reservation("alice", None, 400, "tok"))
            .await
            .unwrap();
        store.release(id, "submit timed out", T0 + 1).await.unwrap();
        let result = store
            .settle(settlement(
                TaskRef::CallbackToken("tok".into()),
                "3",
                "320",
                "0",
            ))
            .await
            .unwrap();
        assert_eq!(
            result,
            SettleResult::Settled {
                key_id: "alice".into(),
                charged: pts(320),
                reservation: Points::ZERO,
                from: TaskState::Released,
                anomaly: None,
            }
        );
        let usage = store.usage("alice", day()).await.unwrap();
        assert_eq!((usage.charged, usage.reserved), (pts(320), Points::ZERO));
    }

    #[tokio::test]
    async fn failed_task_costs_nothing_and_refund_is_informative() {
        let (_dir, store) = open_temp();
        let id = store
            .reserve(reservation("alice", None, 400, "tok"))
            .await
            .unwrap();
        store.attach(id, "task-1", T0).await.unwrap();
        let result = store
            .settle(settlement(
                TaskRef::TaskId("task-1".into()),
                "2",
                "320",
                "320",
            ))
            .await
            .unwrap();
        assert!(
            matches!(result, SettleResult::Settled { charged, .. } if charged == Points::ZERO),
            "{result:?}"
        );
        assert_eq!(store.usage("alice", day()).await.unwrap(), Usage::default());
        let entries = store.ledger_entries("alice", None).await.unwrap();
        assert_eq!(
            kinds(&entries),
            vec![
                (LedgerKind::Reserve, pts(400)),
                (LedgerKind::Release, pts(400)),
                (LedgerKind::Charge, Points::ZERO),
                (LedgerKind::Refund, pts(320)),
            ]
        );
    }

    #[tokio::test]
    async fn missing_point_charges_the_estimate_and_records_the_anomaly() {
        let (_dir, store) = open_temp();
        store
            .reserve(reservation("alice", None, 400, "tok"))
            .await
            .unwrap();
        let result = store
            .settle(settlement(
                TaskRef::CallbackToken("tok".into()),
                "3",
                "",
                "",
            ))
            .await
            .unwrap();
        assert!(
            matches!(
                result,
                SettleResult::Settled { charged, anomaly: Some(Anomaly::MissingPoint), .. }
                    if charged == pts(400)
            ),
            "{result:?}"
        );
        let task = store.task_by_token("tok").await.unwrap().unwrap();
        assert_eq!(task.anomaly, Some(Anomaly::MissingPoint));
        assert_eq!(task.raw_point.as_deref(), Some(""));
    }

    #[tokio::test]
    async fn settle_needs_a_terminal_status_and_a_known_task() {
        let (_dir, store) = open_temp();
        store
            .reserve(reservation("alice", None, 400, "tok"))
            .await
            .unwrap();
        let err = store
            .settle(settlement(
                TaskRef::CallbackToken("tok".into()),
                "1",
                "",
                "",
            ))
            .await
            .unwrap_err();
        assert_eq!(err, StoreError::NotTerminal { status: "1".into() });
        let missing = store
            .settle(settlement(
                TaskRef::CallbackToken("nope".into()),
                "3",
                "1",
                "",
            ))
            .await
            .unwrap();
        assert_eq!(missing, SettleResult::NotFound);
        assert_eq!(
            store.usage("alice", day()).await.unwrap().reserved,
            pts(400)
        );
    }

    #[tokio::test]
    async fn attach_conflicts_are_reported() {
        let (_dir, store) = open_temp();
        let a = store
            .reserve(reservation("alice", None, 1, "a"))
            .await
            .unwrap();
        let b = store
            .reserve(reservation("alice", None, 1, "b"))
            .await
            .unwrap();
        store.attach(a, "task-a", T0).await.unwrap();
        let err = store.attach(a, "task-other", T0).await.unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
        let err = store.attach(b, "task-a", T0).await.unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
        let err = store
            .attach(ReservationId(42), "task-x", T0)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
        assert_eq!(store.task_by_id("task-a").await.unwrap().unwrap().id, a);
    }

    #[tokio::test]
    async fn update_status_and_reconciler_queries() {
        let (_dir, store) = open_temp();
        let mut at = T0;
        for name in ["a", "b", "c"] {
            let mut r = reservation("alice", None, 10, name);
            r.now = at;
            let id = store.reserve(r).await.unwrap();
            store.attach(id, &format!("task-{name}"), at).await.unwrap();
            at += 10;
        }
        let mut r = reservation("alice", None, 10, "never-attached");
        r.now = T0;
        let stale = store.reserve(r).await.unwrap();

        // "a" was checked most recently, so it goes to the back of the queue.
        assert!(store
            .update_status(TaskRef::TaskId("task-a".into()), "1", T0 + 100)
            .await
            .unwrap());
        assert_eq!(
            store.task_by_id("task-a").await.unwrap().unwrap().status,
            "1"
        );
        let pending = store.pending_tasks(T0 + 10, 10).await.unwrap();
        let order: Vec<_> = pending.iter().map(|t| t.task_id.clone().unwrap()).collect();
        assert_eq!(order, vec!["task-b", "task-a"]); // task-c is younger than the cutoff
        assert_eq!(store.pending_tasks(T0 + 100, 1).await.unwrap().len(), 1);

        let stale_list = store.stale_reservations(T0, 10).await.unwrap();
        assert_eq!(
            stale_list.iter().map(|t| t.id).collect::<Vec<_>>(),
            vec![stale]
        );
        assert!(store
            .stale_reservations(T0 - 1, 10)
            .await
            .unwrap()
            .is_empty());

        store
            .settle(settlement(TaskRef::TaskId("task-b".into()), "3", "10", "0"))
            .await
            .unwrap();
        // Closed tasks and unknown ones are not updated; a terminal status stays.
        assert!(!store
            .update_status(TaskRef::TaskId("task-b".into()), "1", T0 + 200)
            .await
            .unwrap());
        assert_eq!(
            store.task_by_id("task-b").await.unwrap().unwrap().status,
            "3"
        );
        assert!(!store
            .update_status(TaskRef::TaskId("nope".into()), "1", T0)
            .await
            .unwrap());

        let counts = store.counts().await.unwrap();
        assert_eq!((counts.reserved_tasks, counts.pending_tasks), (1, 2));
    }

    #[tokio::test]
    async fn acknowledged_reservation_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let id = {
            let store = SqliteStore::open(&path).unwrap();
            {
                let conn = store.conn.lock().unwrap();
                let mode: String = conn
                    .query_row("PRAGMA journal_mode", [], |r| r.get(0))
                    .unwrap();
                let sync: i64 = conn
                    .query_row("PRAGMA synchronous", [], |r| r.get(0))
                    .unwrap();
                assert_eq!((mode.as_str(), sync), ("wal", 2)); // 2 = FULL
            }
            store
                .reserve(reservation("alice", Some(1000), 400, "tok"))
                .await
                .unwrap()
        };
        let store = SqliteStore::open(&path).unwrap();
        let task = store.task_by_token("tok").await.unwrap().unwrap();
        assert_eq!(
            (task.id, task.state, task.reserved),
            (id, TaskState::Reserved, pts(400))
        );
        assert_eq!(
            store.usage("alice", day()).await.unwrap().reserved,
            pts(400)
        );
        assert_eq!(store.stale_reservations(T0, 10).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn migrations_are_idempotent_and_refuse_newer_schemas() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        drop(SqliteStore::open(&path).unwrap());
        let store = SqliteStore::open(&path).unwrap();
        store.ping().await.unwrap();
        {
            let conn = store.conn.lock().unwrap();
            let version: i64 = conn
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .unwrap();
            assert_eq!(version, MIGRATIONS.len() as i64);
        }
        store
            .reserve(reservation("alice", None, 1, "tok"))
            .await
            .unwrap();
        {
            // The ledger is append-only.
            let conn = store.conn.lock().unwrap();
            let err = conn
                .execute("UPDATE ledger_entries SET points_milli = 0", [])
                .unwrap_err();
            assert!(err.to_string().contains("append-only"), "{err}");
            assert!(conn.execute("DELETE FROM ledger_entries", []).is_err());
            conn.pragma_update(None, "user_version", 99).unwrap();
        }
        drop(store);
        let err = SqliteStore::open(&path).unwrap_err();
        assert_eq!(
            err,
            StoreError::SchemaTooNew {
                found: 99,
                known: MIGRATIONS.len() as i64
            }
        );
    }

    #[tokio::test]
    async fn yesterdays_charges_do_not_count_against_today() {
        let (_dir, store) = open_temp();
        let clock = ManualClock::new(T0); // 23:46 UTC
        let reserve_now = |token: &str| NewReservation {
            period: PeriodKey::current(QuotaPeriod::Daily, &clock),
            now: clock.now(),
            ..reservation("alice", Some(500), 400, token)
        };
        store.reserve(reserve_now("y1")).await.unwrap();
        store
            .settle(settlement(
                TaskRef::CallbackToken("y1".into()),
                "3",
                "400",
                "0",
            ))
            .await
            .unwrap();
        assert!(matches!(
            store.reserve(reserve_now("y2")).await,
            Err(StoreError::QuotaExceeded { .. })
        ));

        clock.advance(15 * 60); // past midnight UTC
        let today = PeriodKey::current(QuotaPeriod::Daily, &clock);
        assert_ne!(today, day());
        store.reserve(reserve_now("t1")).await.unwrap();
        assert_eq!(
            store.usage("alice", today.clone()).await.unwrap(),
            Usage {
                charged: Points::ZERO,
                reserved: pts(400),
                open_tasks: 1
            }
        );
        // A reservation made yesterday is settled into yesterday's balance.
        assert_eq!(store.usage("alice", day()).await.unwrap().charged, pts(400));

        // usage_all picks each key's period.
        store
            .reserve(NewReservation {
                period: PeriodKey::all(),
                ..reservation("bob", None, 7, "b1")
            })
            .await
            .unwrap();
        let period_of = |key: &str| {
            if key == "bob" {
                PeriodKey::all()
            } else {
                today.clone()
            }
        };
        let all = store.usage_all(&period_of).await.unwrap();
        let summary: Vec<_> = all
            .iter()
            .map(|k| (k.key_id.as_str(), k.period.as_str(), k.usage.reserved))
            .collect();
        assert_eq!(
            summary,
            vec![("alice", today.as_str(), pts(400)), ("bob", "all", pts(7))]
        );
    }

    #[tokio::test]
    async fn outbox_roundtrip_with_leases_attempts_and_dead_letters() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let store = SqliteStore::open(&path).unwrap();
        let task = store
            .reserve(reservation("alice", None, 1, "tok"))
            .await
            .unwrap();
        let new = |body: &[u8]| NewDelivery {
            reservation: task,
            key_id: "alice".into(),
            url: "https://caller.example/hook".into(),
            body: body.to_vec(),
            now: T0,
        };
        let first = store
            .enqueue_delivery(new(b"{\"status\":\"3\"}"))
            .await
            .unwrap();
        let second = store.enqueue_delivery(new(b"second")).await.unwrap();
        let err = store
            .enqueue_delivery(NewDelivery {
                reservation: ReservationId(999),
                ..new(b"x")
            })
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");

        // Rows survive a restart.
        drop(store);
        let store = SqliteStore::open(&path).unwrap();
        assert!(store
            .due_deliveries(T0 - 1, T0 + 30, 10)
            .await
            .unwrap()
            .is_empty());
        let due = store.due_deliveries(T0, T0 + 30, 10).await.unwrap();
        assert_eq!(
            due.iter().map(|d| d.id).collect::<Vec<_>>(),
            vec![first, second]
        );
        assert_eq!(due[0].body, b"{\"status\":\"3\"}");
        assert_eq!((due[0].attempts, due[0].next_attempt_at), (0, T0 + 30));
        // Leased: an overlapping poll sees nothing until the lease ends.
        assert!(store
            .due_deliveries(T0 + 1, T0 + 60, 10)
            .await
            .unwrap()
            .is_empty());

        assert!(store
            .mark_attempt_failed(first, T0 + 10, "HTTP 503")
            .await
            .unwrap());
        let due = store.due_deliveries(T0 + 10, T0 + 40, 10).await.unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(
            (due[0].id, due[0].attempts, due[0].last_error.as_deref()),
            (first, 1, Some("HTTP 503"))
        );
        assert!(store.mark_delivered(first, T0 + 11).await.unwrap());
        assert!(!store.mark_delivered(first, T0 + 12).await.unwrap());
        let done = store.delivery(first).await.unwrap().unwrap();
        assert_eq!(
            (done.state, done.attempts, done.done_at),
            (DeliveryState::Delivered, 2, Some(T0 + 11))
        );

        // The second delivery's lease expired: it is due again, then dies.
        let due = store.due_deliveries(T0 + 30, T0 + 60, 10).await.unwrap();
        assert_eq!(due.iter().map(|d| d.id).collect::<Vec<_>>(), vec![second]);
        assert!(store
            .mark_dead(second, "connection refused", T0 + 31)
            .await
            .unwrap());
        assert!(!store
            .mark_attempt_failed(second, T0 + 40, "x")
            .await
            .unwrap());
        let dead = store.delivery(second).await.unwrap().unwrap();
        assert_eq!((dead.state, dead.attempts), (DeliveryState::Dead, 1));
        assert!(store
            .due_deliveries(i64::MAX, i64::MAX, 10)
            .await
            .unwrap()
            .is_empty());
        let counts = store.counts().await.unwrap();
        assert_eq!((counts.queued_deliveries, counts.dead_deliveries), (0, 1));
    }

    /// Random operations across keys and periods; afterwards every balance equals what its
    /// ledger rows add up to, and `reserved` equals the open tasks' reservations.
    #[tokio::test]
    async fn ledger_rows_always_add_up_to_the_balances() {
        let (_dir, store) = open_temp();
        let mut rng = StdRng::seed_from_u64(0x1ed9e7);
        let keys = ["alice", "bob"];
        let periods = [
            PeriodKey::parse("2026-11-24").unwrap(),
            PeriodKey::parse("2026-11-25").unwrap(),
        ];
        let mut open: Vec<(ReservationId, Option<String>)> = Vec::new();
        let mut all: Vec<ReservationId> = Vec::new();
        for step in 0..300 {
            match rng.random_range(0..10) {
                0..=3 => {
                    let r = NewReservation {
                        period: periods[rng.random_range(0..2)].clone(),
                        price: Points::from_milli(rng.random_range(0..500_000)),
                        quota: Some(pts(5_000)),
                        ..reservation(keys[rng.random_range(0..2)], None, 0, &format!("t{step}"))
                    };
                    match store.reserve(r).await {
                        Ok(id) => {
                            open.push((id, None));
                            all.push(id);
                        }
                        Err(StoreError::QuotaExceeded { .. }) => {}
                        Err(other) => panic!("{other:?}"),
                    }
                }
                4 | 5 if !open.is_empty() => {
                    let i = rng.random_range(0..open.len());
                    if open[i].1.is_none() {
                        let task_id = format!("task-{step}");
                        store.attach(open[i].0, &task_id, T0).await.unwrap();
                        open[i].1 = Some(task_id);
                    }
                }
                6 if !open.is_empty() => {
                    let (id, _) = open.swap_remove(rng.random_range(0..open.len()));
                    store.release(id, "submit failed", T0).await.unwrap();
                }
                7 | 8 if !all.is_empty() => {
                    // Any task, open or not: duplicates and late callbacks included.
                    let id = all[rng.random_range(0..all.len())];
                    let status = ["2", "3"][rng.random_range(0..2)];
                    let point = ["320", "12.5", "", "x", "0"][rng.random_range(0..5)];
                    let refund = ["0", "", "20", "1", "500"][rng.random_range(0..5)];
                    store
                        .settle(settlement(TaskRef::Reservation(id), status, point, refund))
                        .await
                        .unwrap();
                    open.retain(|(o, _)| *o != id);
                }
                9 => {
                    store
                        .adjust(Adjustment {
                            key_id: keys[rng.random_range(0..2)].into(),
                            period: periods[rng.random_range(0..2)].clone(),
                            points: Points::from_milli(rng.random_range(-50_000..50_000)),
                            note: "correction".into(),
                            now: T0,
                        })
                        .await
                        .unwrap();
                }
                _ => {}
            }
        }

        let mut checked = 0;
        for key in keys {
            let mut sums: HashMap<String, (i64, i64)> = HashMap::new();
            for entry in store.ledger_entries(key, None).await.unwrap() {
                let sum = sums.entry(entry.period.to_string()).or_default();
                match entry.kind {
                    LedgerKind::Reserve => sum.1 += entry.points.milli(),
                    LedgerKind::Release => sum.1 -= entry.points.milli(),
                    LedgerKind::Charge | LedgerKind::Adjust => sum.0 += entry.points.milli(),
                    LedgerKind::Refund => {}
                }
            }
            for period in &periods {
                let usage = store.usage(key, period.clone()).await.unwrap();
                let (charged, reserved) = sums.get(period.as_str()).copied().unwrap_or_default();
                assert_eq!(usage.charged.milli(), charged, "{key} {period} charged");
                assert_eq!(usage.reserved.milli(), reserved, "{key} {period} reserved");
                let open_sum: i64 = {
                    let conn = store.conn.lock().unwrap();
                    conn.query_row(
                        "SELECT COALESCE(SUM(reserved_milli), 0) FROM tasks
                         WHERE key_id = ?1 AND period = ?2 AND state IN ('reserved', 'pending')",
                        params![key, period.as_str()],
                        |r| r.get(0),
                    )
                    .unwrap()
                };
                assert_eq!(
                    usage.reserved.milli(),
                    open_sum,
                    "{key} {period} open tasks"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 4);
        assert!(all.len() > 20, "the sequence should exercise many tasks");
    }
}
