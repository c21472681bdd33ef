// Package tenantpg is a database/sql driver for applications that give every
// tenant (workspace) its own PostgreSQL database. Every physical connection,
// to every database opened through it, draws one token from the budget of
// its server (host and port; [Config.MaxConnections] each, or a figure of
// its own in [Config.ServerMaxConnections]), so a server never sees more
// connections than its budget however many workspaces are open. With
// [Config.FleetMaxConnections] one budget is shared by every process (every
// replica of a service) using the same server and role, coordinated through
// advisory locks on one session per process (see "Fleet budget" below).
//
// # Why
//
// Opening a *sql.DB per workspace gives each workspace its own pool. With a
// few dozen busy workspaces the pools together exceed the server's
// max_connections and every request fails with "sorry, too many clients
// already" (SQLSTATE 53300). Nothing in database/sql or pgx caps connections
// across pools, and an external pooler caps them without handing idle
// connections of one database over to another that needs one now.
//
// # Use
//
// Import the package for its side effect and open each workspace as before:
//
//	import _ "github.com/tenantpg/tenantpg"
//
//	db, err := sql.Open("tenantpg", "postgres://app:secret@db:5432/ws_abc?workspace=abc")
//
// or use [OpenDB], which also sets the *sql.DB's idle-handle limit for the
// driver (recommended). Any DSN that pgx accepts works, in URL or
// keyword/value form. tenantpg reads and removes three parameters of its
// own: workspace (a label for stats, errors and metrics; default the
// database name), pool_max_conns (this database's cap) and
// pool_reserved_conns (connections set aside for this database alone, for
// an application's system database).
//
// # One *sql.DB for every workspace
//
// A DSN whose database name holds the {workspace} placeholder opens one
// *sql.DB that serves every workspace: each call goes to the database named
// by the placeholder replaced with the workspace of the call's context,
//
//	db, err := tenantpg.OpenDB("postgres://app:secret@db:5432/ws_{workspace}")
//	db.QueryContext(tenantpg.WithWorkspace(ctx, "abc"), "SELECT ...")
//
// A call whose context names no workspace fails with [ErrNoWorkspace],
// except a ping (gorm.Open's, a readiness probe's), which answers whether
// the server is reachable, with a [ServerDownError] when it is not.
// Transactions, a *sql.Conn and Raw stay on the workspace they started on
// ([WorkspaceMismatchError]). [Config.ResolveWorkspace] maps ids the
// pattern does not.
//
// # The model
//
// The driver owns the physical connections (backends); database/sql's
// connections are handles that take a backend of their database when
// database/sql starts using them and give it back when database/sql takes
// them back. A transaction, a *sql.Conn, open Rows and Raw keep their
// backend throughout. Between two checkouts a handle may get another
// backend, which database/sql never promised otherwise; keep session state
// (SET, temporary tables, advisory locks) inside a transaction or a
// *sql.Conn.
//
// A token is taken before a dial starts and given back only after the server
// has closed the backend's socket, so backends being dialed and being closed
// count too. Each database is also capped (3 by default) so that one busy
// workspace cannot take the whole budget.
//
// A checkout takes an idle backend of its database, or waits for a busy
// one, which is handed over at check-in in arrival order, or dials another.
// It dials only when waiting would cost more: the queue's total wait,
// estimated from the database's average use time, against the driver's
// average dial time. A caller that has waited as long as a dial takes dials
// too.
//
// When a dial needs a token and the budget is full, the idle backend of the
// least recently used database is closed and its token handed to the
// caller. Recency is segmented: databases that have reused a backend are
// protected (up to 80% of the budget) and evicted only after those that
// have not, so a long tail of workspaces seen once does not push out the
// hot ones. A spare backend, of a database that keeps another, goes before
// any database's last one, which costs that database a dial when it is
// next used; a database that already holds a backend and wants another
// takes only a spare one idle for a second or more, or else waits for its
// own. Choosing a victim does not depend on the number of databases. A
// backend a handle holds is never touched.
//
// Dials are paced: a caller that is to dial first waits for one of a few
// dial slots (4, more while dials stay near the server's recent fastest,
// halved when they take twice that), holding no token and closing
// nothing, so that the budget stays a cache of backends rather than a
// queue of dials sharing the server's cores.
//
// When nothing idle can be closed, callers wait in arrival order until a
// token frees, their context ends or [Config.AcquireTimeout] passes; they
// then get an error that matches [ErrBudgetExhausted] (see [BudgetError]).
// A caller of a database with no backend that has waited more than 100ms
// for a token takes the token of the next backend any other database checks
// in, so that a cold workspace is not starved by hot ones.
//
// # Server outages
//
// Each server (host and port) has a circuit. A dial that finds the server
// unreachable, refusing connections, shutting down or starting up (SQLSTATE
// 57P03, 57P01 at login), or not answering within 250ms while it answers no
// other dial either (longer for a server whose dials are slow on average)
// marks it down. While it is down its
// callers wait, within their context and the acquire timeout, and one probe
// dial at a time retries it with backoff (50ms doubling to 1s, jittered).
// When a probe connects, the waiting callers proceed. A restart thus shows
// up as latency: only statements in flight when the server went down fail,
// and callers whose deadline passes first get a [ServerDownError].
//
// # Fleet budget
//
// With [Config.FleetMaxConnections] set (equal to the role's CONNECTION
// LIMIT), each process leases slots of that budget as session-level
// advisory locks held by one coordination session per server, in batches,
// and dials only on a leased slot. A process short of slots asks the others
// with NOTIFY; they close idle backends down to what their callers use (and
// busy ones beyond a fair share as they are returned) and unlock those
// slots. A process that dies frees its slots when its session ends;
// [Driver.Close] unlocks them at once. The coordination session counts in
// the budget, and one slot is kept free for a joining process's session.
// Only sessions of the fleet's role count as members and are heard; while a
// session of another role holds slots, a process serves at a floor of one
// connection per server and reports it (see the README on a dedicated
// fleet database).
//
// Idle backends older than [Config.ConnMaxIdleTime] and backends older
// than [Config.ConnMaxLifetime] are closed by the driver itself. A database
// with no backends costs no goroutine and its state is dropped once no
// *sql.DB uses it; closing the last *sql.DB of a database closes its idle
// backends.
//
// # Configuration
//
// The registered driver reads TENANTPG_MAX_CONNECTIONS,
// TENANTPG_MAX_CONNECTIONS_PER_DB, TENANTPG_CONN_MAX_LIFETIME,
// TENANTPG_CONN_MAX_IDLE_TIME, TENANTPG_ACQUIRE_TIMEOUT and
// TENANTPG_LEAK_THRESHOLD the first time it is used, unless [Configure] set its settings from code first. [NewDriver]
// makes a driver with a budget of its own. Settings may change at run time:
// lowering the budget closes idle connections at once and busy ones as they
// are returned.
//
// # Metrics, stats and logs
//
// Each driver reports OpenTelemetry metrics (the db.client.connection.*
// semantic conventions per workspace, tenantpg.budget.* for the budget)
// through [Config.MeterProvider] or the global provider. Per-workspace
// series exist only while a workspace holds connections or has callers
// waiting. [Driver.Stats] returns a JSON-ready snapshot and [StatsHandler]
// serves it; [Config.Logger] receives evictions, exhaustion and dial
// failures.
//
// # Traces
//
// With [Config.TracerProvider] or a global provider installed, each
// statement gets a client span with the semconv db.* attributes and the
// workspace (db.query.text only with [Config.TraceQueryText], its literals
// replaced by ?), and a checkout that waited or dialed gets a tenantpg.acquire
// span: how long it queued for a backend and for a token, which workspace
// was evicted for it, and the dial.
//
// # Errors
//
// [BudgetError] (errors.Is [ErrBudgetExhausted]): no connection within the
// wait; answer 503 with Retry-After. [ServerDownError] (errors.Is
// [ErrServerDown]): the server of the database was down for the whole wait;
// also a 503. [ConnectError]: the dial failed; it
// wraps what pgx's error wraps, so the server's SQLSTATE is reachable with
// errors.As, but not pgx's *pgconn.ConnectError, whose Config holds the
// password.
// [DSNError] and [ConfigError]: bad input. No error, stats field or log line
// contains a password or a DSN.
//
// # Caveats
//
// A pinned connection (db.Conn, a transaction, an open *sql.Rows) holds its
// token until it is released. database/sql keeps every connection reachable
// from its *sql.DB while that is open, so a leaked one holds its token while
// its *sql.DB is open; [Config.LeakThreshold] logs it, with the stack that
// checked it out. Once the *sql.DB is closed and dropped with the leaked
// *sql.Rows or *sql.Conn, the garbage collector finds the driver's handle
// and the driver closes its backend and takes the token back (eviction
// reason abandoned); a caller that waits meanwhile triggers a collection,
// at most one a second. A *sql.Tx left open is not reclaimed: database/sql
// watches its context from a goroutine, which keeps it reachable until the
// context ends (and then rolls it back itself); nor is a [PoolConn] never
// released.
//
// (*sql.DB).Stats counts handles; [Driver.Stats] counts backends, what the
// server sees. A new backend costs
// the server a fork and authentication, so a workload that touches more
// databases at once than the budget can hold is bound by connection setup,
// not by the driver.
package tenantpg
